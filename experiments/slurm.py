"""Submitting the pipeline to Slurm with submitit; the login-node side.

A pipeline is at most two jobs. The tokenizer stages (tok_train, tok_eval) run first as one small CPU job, so
that they do not hold GPU nodes for the minutes they take; the training and evaluation stages run as one GPU job
(N nodes x one task per GPU) that starts once the first has succeeded (`--dependency=afterok`). One job for all
GPU stages, rather than one per stage, keeps the allocation (and its warm compile caches) across stage changes
and waits in the queue once. The submission returns at once; the jobs write their logs into <run>/slurm/.
"""

import json
import os
import shlex
import sys
import time
from pathlib import Path

from nanochat.common import UserError
from nanochat.preemption import VERDICT_DIR_ENV
from nanochat.runs import Run
from nanochat.stage_table import CPU_JOB_STAGES

from experiments.cluster import ClusterConfig

REPO = Path(__file__).resolve().parent.parent


def executor(folder: Path, cluster: ClusterConfig, *, gpu: bool, env: dict[str, str]):
    """A submitit executor for one of the two jobs; every rank gets `env` and the profile's setup lines."""
    import submitit

    # our own code requeues, not submitit; cluster.python: the interpreter the tasks run (a container's, say)
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=0, python=cluster.python)
    env = {**cluster.env, **env, VERDICT_DIR_ENV: str(folder)}  # where ranks that leave abnormally say why
    exports = [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    # in the batch step (outside any container), before srun: how earlier runs of the job ended, failed nodes out
    before = [f'eval "$(bash {shlex.quote(str(REPO / "slurm" / "before_srun.sh"))} {shlex.quote(str(folder))})"']
    # after srun: requeue when the ranks' exit code or verdicts ask
    after = [f"bash {shlex.quote(str(REPO / 'slurm' / 'after_srun.sh'))} $? {shlex.quote(str(folder))}"]
    # set +e: a profile's setup lines may `set -e`, which would end the script at a failed srun, before `after`
    common = dict(setup=list(cluster.setup) + exports + ["set +e"] + before, teardown=after,
                  signal_delay_s=cluster.signal_lead_s,
                  account=cluster.account, qos=cluster.qos, constraint=cluster.constraint,
                  srun_args=list(cluster.srun_args) + ["--kill-on-bad-exit=1"],
                  # a dead node: Slurm ends the run (NODE_FAIL) and requeues the job itself. Not --no-kill: when
                  # the batch step's node is the dead one, Slurm 22.05 shrinks the job to the survivors and keeps
                  # it RUNNING, with nothing left to run, until its time limit (measured on the dev cluster)
                  additional_parameters={"requeue": True})
    if gpu:
        ex.update_parameters(partition=cluster.partition, nodes=cluster.nodes, ntasks_per_node=cluster.ranks_per_node,
                             gpus_per_node=cluster.gpus_per_node or None, cpus_per_task=cluster.cpus_per_task,
                             mem=f"{cluster.mem_gb}GB" if cluster.mem_gb else None, time=cluster.time_min, **common)
    else:
        job = cluster.cpu_job
        ex.update_parameters(partition=job.partition or cluster.partition, nodes=1, ntasks_per_node=1,
                             cpus_per_task=job.cpus, mem=f"{job.mem_gb}GB" if job.mem_gb else None,
                             time=job.time_min, **common)
    return ex


def job_env(cfg) -> dict[str, str]:
    """Where the jobs find shared data, compile caches that survive a requeue, and the requeue cap that the batch
    step applies (slurm/after_srun.sh)."""
    cluster = cfg.cluster
    # PYTHONPATH: the pickled entry point imports experiments
    env = {"PYTHONPATH": str(REPO), "NANOCHAT_MAX_REQUEUES": str(cfg.max_requeues),
           "NANOCHAT_SIGNAL_LEAD_S": str(cluster.signal_lead_s)}
    if cluster.base_dir:
        env["NANOCHAT_BASE_DIR"] = cluster.base_dir
    elif os.environ.get("NANOCHAT_BASE_DIR"):
        env["NANOCHAT_BASE_DIR"] = os.environ["NANOCHAT_BASE_DIR"]
    if cluster.compile_cache:
        env["TRITON_CACHE_DIR"] = f"{cluster.compile_cache}/triton"
        env["TORCHINDUCTOR_CACHE_DIR"] = f"{cluster.compile_cache}/inductor"
    return env


def submit(cfg, run: Run, overrides: list[str]) -> list[str]:
    """Submit what is left of the pipeline; print the contract's lines; return the job ids."""
    from experiments.job import run_in_job

    cluster = cfg.cluster
    if not cluster.partition:
        raise UserError(f"cluster profile {cluster.name!r} has no partition; set cluster.partition=NAME")
    todo = [s for s in cfg.stages if not run.is_done(s)]
    if not todo:
        print(f"Nothing to submit: every stage of {run.root} is done")
        return []
    folder = run.slurm_dir
    env = job_env(cfg)
    passthrough = [o for o in overrides if not o.startswith("stages=")]
    cpu_stages = [s for s in todo if s in CPU_JOB_STAGES]
    gpu_stages = [s for s in todo if s not in CPU_JOB_STAGES]
    jobs = []
    if cpu_stages:
        ex = executor(folder, cluster, gpu=False, env=env)
        ex.update_parameters(job_name=f"{run.root.name}-tok")
        jobs.append(("cpu", cpu_stages, ex.submit(run_in_job, passthrough + [_stages(cpu_stages)])))
    if gpu_stages:
        ex = executor(folder, cluster, gpu=True, env=env)
        ex.update_parameters(job_name=run.root.name)
        if jobs:
            ex.update_parameters(dependency=f"afterok:{jobs[0][2].job_id}")
        jobs.append(("gpu", gpu_stages, ex.submit(run_in_job, passthrough + [_stages(gpu_stages)])))
    record_jobs(run, jobs)
    main_kind, main_stages, main_job = jobs[-1]
    print(f"Submitted job {main_job.job_id}")
    for kind, stages, job in jobs:
        ranks = cluster.nodes * cluster.ranks_per_node if kind == "gpu" else 1
        after = f", after job {jobs[0][2].job_id}" if kind == "gpu" and len(jobs) == 2 else ""
        print(f"  job {job.job_id}: {', '.join(stages)} ({ranks} rank(s){after})")
        # rank 0's files; tracebacks and one-line errors go to the .err, progress to the .out
        print(f"    log: {job.paths.stderr} (errors), {job.paths.stdout.name} (output)")
    ids = " ".join(job.job_id for _, _, job in jobs)
    print(f"  follow: tail -f {main_job.paths.stdout} {main_job.paths.stderr}   |   "
          f"python -m experiments.status {run.root}")
    print(f"  cancel: scancel {ids}")
    return [job.job_id for _, _, job in jobs]


def _stages(stages: list[str]) -> str:
    return f"stages=[{','.join(stages)}]"


def record_jobs(run: Run, jobs) -> None:
    """Append (kind, stages, submitit job) records to the run's jobs.jsonl (Run.jobs reads them back)."""
    run.slurm_dir.mkdir(parents=True, exist_ok=True)
    with open(run.jobs_path, "a") as f:
        for kind, stages, job in jobs:
            f.write(json.dumps({"job_id": job.job_id, "kind": kind, "stages": stages, "submitted": time.time(),
                                "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                                "argv": sys.argv[1:]}) + "\n")
