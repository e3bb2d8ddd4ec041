"""Sweeps: the scaling-law ones, `+experiment=miniseries` (depths, each at its compute-optimal horizon) and
`+experiment=isoflop` (FLOP budgets x depths, each run's horizon from its budget via target_flops), and
`-m key=a,b key2=c,d ...` (kind "multirun", multirun.py): every combination of the values of any keys.

A sweep's axes are what it varies (an isoflop's target_flops and depth, a miniseries' depth, -m's keys); each run
is one combination of their values: the sweep's command plus a few overrides (run_name, its values, the shared
tokenizer). A sweep is a folder (nanochat.runs.Sweep) of these ordinary runs and a manifest:

    <runs_root>/<sweep>/                 <sweep> = run_name, default the experiment's name (-m: <name>-multirun)
        manifest.json                    the sweep's kind, axes and config, its runs with their values and planned
                                         horizons, every submission and each run's jobs; rewritten atomically
        tokenizer/                       an ordinary run folder (tok_train, tok_eval): trained once, shared
        <sweep>-<budget>-d<depth>/       one run folder per run (isoflop); <sweep>-d<depth> for a miniseries;
                                         -m: <sweep>-<key><value>-... (d<depth>; a dotted key's last part)
        slurm/                           the jobs' logs

On a cluster, the runs are grouped by the resources their depth needs (`sweep_resources`) and each group is one
Slurm job array, with its own GPU count and time limit and a `%N` limit (`sweep_parallelism`); the arrays start
after the tokenizer job (`afterok`). Arrays are submitted with submitit directly, not with hydra-submitit-launcher,
which waits for its jobs to end and does not requeue: here the prompt comes back at once, and every element runs
experiments.job.run_in_job like a single job, so it resumes from its checkpoints and requeues itself on a time
limit or preemption (array-aware) the same way. Each run's plan is checked before anything is submitted (a budget
too small for a depth fails at the prompt, not at 3 a.m.). Running the command again submits only the runs that
are neither done nor still queued or running. Without +cluster the runs go one after another on this machine.

Its parts, one job each: multirun.py (-m's overrides into axes), plan.py (the checks, the runs, their resource
groups and horizons), manifest.py (the sweep's record), submit.py (submitting, or running here, what is left),
status.py (one line per run).
"""

from experiments.sweep.submit import launch_sweep

__all__ = ["launch_sweep"]
