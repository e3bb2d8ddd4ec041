"""Scaling-law sweeps: `+experiment=miniseries` (depths, each at its compute-optimal horizon) and
`+experiment=isoflop` (FLOP budgets x depths, each run's horizon from its budget via target_flops).

A sweep is a folder of ordinary runs, each one the sweep's command plus a few overrides (run_name, depth,
target_flops, the shared tokenizer), and a manifest:

    <runs_root>/<sweep>/                 <sweep> = run_name, default the experiment's name
        manifest.json                    the sweep's config, its runs with their planned horizons, every
                                         submission and each run's jobs; rewritten atomically on each submission
        tokenizer/                       an ordinary run folder (tok_train, tok_eval): trained once, shared
        <sweep>-<budget>-d<depth>/       one run folder per run (isoflop); <sweep>-d<depth> for a miniseries
        slurm/                           the jobs' logs

On a cluster, the runs are grouped by the resources their depth needs (`sweep_resources`) and each group is one
Slurm job array, with its own GPU count and time limit and a `%N` limit (`sweep_parallelism`); the arrays start
after the tokenizer job (`afterok`). Arrays are submitted with submitit directly, not with hydra-submitit-launcher,
which waits for its jobs to end and does not requeue: here the prompt comes back at once, and every element runs
experiments.job.run_in_job like a single job, so it resumes from its checkpoints and requeues itself on a time
limit or preemption (array-aware) the same way. Each run's plan is checked before anything is submitted (a budget
too small for a depth fails at the prompt, not at 3 a.m.). Running the command again submits only the runs that
are neither done nor still queued or running. Without +cluster the runs go one after another on this machine.
"""

import dataclasses
import getpass
import json
import subprocess
import time
from pathlib import Path

from nanochat.common import UserError, atomic_write_json
from nanochat.runs import Run, Sweep

from experiments.cluster import SweepResources

KINDS = ("miniseries", "isoflop")
CLEARED = ["sweep=null", "depths=[]", "flops_budgets=[]"]  # what makes a run of the sweep an ordinary run


@dataclasses.dataclass
class SweepRun:
    name: str
    depth: int
    budget: float | None  # target_flops (isoflop); None: the compute-optimal horizon (miniseries)
    group: int  # index into the resource groups; a group is one job array
    overrides: list[str]  # appended to the sweep's command line, they make this run's config
    cfg: object = None  # composed from those, as the job composes it
    plan: dict = dataclasses.field(default_factory=dict)  # what the depth dial makes of it, for the manifest
    job: dict | None = None  # the job submitted now, for the manifest


def is_done(run: Run, stages: list[str]) -> bool:
    return all(run.is_done(s) for s in stages)


def check(cfg) -> None:
    """The sweep keys, in one line each when wrong."""
    if cfg.sweep is None:
        if cfg.depths or cfg.flops_budgets:
            raise UserError("depths= and flops_budgets= are sweep keys: add +experiment=miniseries or "
                            "+experiment=isoflop (or sweep=miniseries|isoflop)")
        return
    if cfg.sweep not in KINDS:
        raise UserError(f"unknown sweep={cfg.sweep!r}; valid: {', '.join(KINDS)}")
    if not cfg.depths:
        raise UserError(f"sweep={cfg.sweep} needs depths=[...], at least one")
    if min(cfg.depths) < 1 or len(set(cfg.depths)) != len(cfg.depths):
        raise UserError(f"depths={cfg.depths} must be distinct and >= 1")
    if cfg.sweep == "isoflop":
        if not cfg.flops_budgets:
            raise UserError("sweep=isoflop needs flops_budgets=[...], at least one")
        if min(cfg.flops_budgets) <= 0:
            raise UserError(f"flops_budgets={cfg.flops_budgets} must be > 0")
        if cfg.num_iterations > 0:
            raise UserError(f"num_iterations={cfg.num_iterations} would override each run's budget; "
                            f"set num_iterations=-1")
    else:
        if cfg.flops_budgets:
            raise UserError("flops_budgets= is for sweep=isoflop; a miniseries trains each depth at "
                            "target_param_data_ratio")
        if cfg.num_iterations > 0 or cfg.target_flops > 0:
            raise UserError("a miniseries trains each depth at its compute-optimal horizon "
                            "(target_param_data_ratio); set num_iterations=-1 target_flops=-1")
    if cfg.sweep_parallelism < 0:
        raise UserError(f"sweep_parallelism={cfg.sweep_parallelism} must be >= 0 (0: no limit)")


def sweep_folder(cfg) -> Path:
    from experiments.config import runs_root

    return runs_root(cfg).resolve() / (cfg.run_name or cfg.experiment_name)


def resource_groups(cfg) -> list[SweepResources]:
    """One group per sweep_resources entry, by max_depth; none: one group with the profile's resources."""
    groups = sorted(cfg.sweep_resources, key=lambda r: r.max_depth)
    if not groups:
        return [SweepResources(max_depth=max(cfg.depths))]
    too_deep = [d for d in cfg.depths if d > groups[-1].max_depth]
    if too_deep:
        raise UserError(f"depth(s) {too_deep} are above every sweep_resources max_depth "
                        f"({groups[-1].max_depth}); add an entry for them")
    return groups


def budget_label(budget: float) -> str:
    """1e18, 2.15e18: upstream's tags."""
    mantissa, _, exponent = f"{budget:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def expand(cfg, folder: Path, tokenizer: Path, groups: list[SweepResources]) -> list[SweepRun]:
    """Depths (x budgets) into runs, in submission order: smaller budgets first, so the first isoflop curves
    are complete early."""
    sweep = folder.name
    stages = run_stages(cfg)
    runs = []
    for budget in sorted(cfg.flops_budgets) or [None]:
        for depth in sorted(cfg.depths):
            name = f"{sweep}-d{depth}" if budget is None else f"{sweep}-{budget_label(budget)}-d{depth}"
            group = next(i for i, g in enumerate(groups) if depth <= g.max_depth)
            overrides = [f"run_name={name}", f"runs_root={folder}", f"tokenizer={tokenizer}", f"depth={depth}",
                         f"stages=[{','.join(stages)}]", *CLEARED]
            if budget is not None:
                overrides.append(f"target_flops={budget!r}")
            if groups[group].device_batch_size:
                overrides.append(f"device_batch_size={groups[group].device_batch_size}")
            runs.append(SweepRun(name, depth, budget, group, overrides))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"flops_budgets={cfg.flops_budgets} give runs the same name; make them differ in the "
                        f"first 3 significant digits")
    return runs


def run_stages(cfg) -> list[str]:
    from nanochat.stage_table import CPU_JOB_STAGES

    stages = [s for s in cfg.stages if s not in CPU_JOB_STAGES]
    if not stages:
        raise UserError(f"stages={cfg.stages} leave nothing for the runs of a sweep; add base_train")
    return stages


def tokenizer_stages(cfg) -> list[str]:
    return ["tok_train"] + (["tok_eval"] if "tok_eval" in cfg.stages else [])


def group_cluster(cluster, res: SweepResources):
    changes = {k: getattr(res, k) for k in ("nodes", "gpus_per_node", "time_min") if getattr(res, k) is not None}
    return dataclasses.replace(cluster, **changes)


def plan_runs(runs: list[SweepRun], cfg, schema_overrides: list[str], groups, vocab_size: int) -> None:
    """Compose each run's config as its job will, and plan it with the depth dial: a budget too small for a depth,
    or a batch that does not divide over the group's GPUs, is a user error here."""
    from nanochat import depth as depth_dial

    from experiments.config import load_config

    for run in runs:
        run.cfg = load_config(schema_overrides + run.overrides)
        if cfg.cluster:
            gc = group_cluster(cfg.cluster, groups[run.group])
            world = gc.nodes * gc.ranks_per_node
        else:
            world = cfg.nproc
        try:
            plan = depth_dial.plan(run.cfg, vocab_size, world)
        except UserError as exc:
            raise UserError(f"run {run.name}: {exc}") from None
        run.plan = {"steps": plan.num_iterations, "total_batch_size": plan.total_batch_size,
                    "tokens": plan.total_tokens, "flops": plan.flops_per_token * plan.total_tokens,
                    "params_scaling": plan.params_scaling, "world_size": world,
                    "tokens_per_param": float(f"{plan.total_tokens / plan.params_scaling:.3g}")}


def vocab_size(cfg, tokenizer: Path) -> int:
    """The shared tokenizer's, once it exists (or was given); until then the one it will be trained to."""
    from nanochat.tokenizer import Tokenizer

    if cfg.tokenizer or (tokenizer / "tokenizer.pkl").is_file():
        return Tokenizer.load(tokenizer).get_vocab_size()
    return cfg.tok_train.vocab_size


def queued_jobs() -> dict[str, str]:
    """This user's queued and running jobs, one per array element ({'123_4': 'RUNNING'}); {} without Slurm."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def read_manifest(folder: Path) -> dict:
    path = Sweep(folder).manifest_path
    return json.loads(path.read_text()) if path.is_file() else {}


def last_job(entry: dict | None) -> str | None:
    return entry["jobs"][-1]["job_id"] if entry and entry.get("jobs") else None


def last_tokenizer_job(manifest: dict) -> str | None:
    jobs = [s["tokenizer_job"]["job_id"] for s in manifest.get("submissions", []) if s.get("tokenizer_job")]
    return jobs[-1] if jobs else None


def launch_sweep(cfg, overrides: list[str], resume_changed: bool) -> None:
    """`python -m experiments.launch +experiment=isoflop [+cluster=NAME] ...`: submit (or run here) what is left."""
    from experiments.config import load_config
    from experiments.pipeline import prepare_run
    from experiments.resume_guard import split_resume_flag

    check(cfg)
    if cfg.cluster and not cfg.cluster.partition:
        raise UserError(f"cluster profile {cfg.cluster.name!r} has no partition; set cluster.partition=NAME")
    schema_overrides, _ = split_resume_flag(overrides)
    folder = sweep_folder(cfg)
    tok_run = Sweep(folder).tokenizer_run
    tokenizer = Path(cfg.tokenizer).resolve() if cfg.tokenizer else tok_run.tokenizer_dir
    groups = resource_groups(cfg)
    runs = expand(cfg, folder, tokenizer, groups)
    plan_runs(runs, cfg, schema_overrides, groups, vocab_size(cfg, tokenizer))
    manifest = read_manifest(folder)
    previous = {e["run_name"]: e for e in manifest.get("runs", [])}
    queued = queued_jobs() if cfg.cluster else {}
    stages = run_stages(cfg)
    done = [r for r in runs if is_done(Sweep(folder).run(r.name), stages)]
    in_flight = [r for r in runs if r not in done and last_job(previous.get(r.name)) in queued]
    todo = [r for r in runs if r not in done and r not in in_flight]
    counts = f"{len(done)} of {len(runs)} runs done" + (f", {len(in_flight)} queued or running" if in_flight else "")
    if not todo:
        print(f"Nothing to {'submit' if cfg.cluster else 'run'}: {counts} ({folder})")
        return
    # the tokenizer run, unless its tokenizer exists (or was given) or its job is still queued
    tok_overrides, queued_tok = None, last_tokenizer_job(manifest)
    if not cfg.tokenizer and not tok_run.is_done("tok_train") and queued_tok not in queued:
        tok_overrides = [f"run_name={tok_run.root.name}", f"runs_root={folder}",
                         f"stages=[{','.join(tokenizer_stages(cfg))}]", *CLEARED]
        prepare_run(load_config(schema_overrides + tok_overrides), resume_changed)
    for run in todo:  # every run's config is checked against its folder before anything starts
        prepare_run(run.cfg, resume_changed)
    if cfg.cluster is None:
        _write_manifest(folder, cfg, runs, stages, tokenizer, manifest, submission=None)
        print(f"{counts}; running {len(todo)} here, one after another")
        _run_here(overrides, tok_overrides, todo, resume_changed)
        return
    submission = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": overrides, "tokenizer_job": None,
                  "after": queued_tok if queued_tok in queued else None, "arrays": []}
    try:
        _submit(cfg, overrides, folder, groups, tok_overrides, todo, submission)
    finally:  # also after a refused sbatch: what was submitted is recorded, and a rerun submits the rest
        if submission["tokenizer_job"] or submission["arrays"]:
            _write_manifest(folder, cfg, runs, stages, tokenizer, manifest, submission)
    _print_submission(cfg, folder, todo, counts, submission, queued)


def _run_here(overrides, tok_overrides, todo, resume_changed) -> None:
    from nanochat.preemption import HANDLER

    from experiments.config import load_config
    from experiments.pipeline import run_pipeline
    from experiments.resume_guard import split_resume_flag

    HANDLER.install()
    if tok_overrides:
        tok_cfg = load_config(split_resume_flag(overrides)[0] + tok_overrides)
        run_pipeline(tok_cfg, overrides + tok_overrides, resume_changed)
    for run in todo:
        run_pipeline(run.cfg, overrides + run.overrides, resume_changed)


def _submit(cfg, overrides, folder, groups, tok_overrides, todo, submission: dict) -> None:
    """Submit the tokenizer job (when asked) and one array per resource group after it; record each job in
    `submission` (the manifest's record) and in its run's jobs.jsonl as soon as it is submitted."""
    from submitit.core.utils import FailedJobError

    from experiments.job import run_in_job
    from experiments.slurm import executor, job_env, record_jobs

    sweep = Sweep(folder)
    env, logs = job_env(cfg.cluster), sweep.slurm_dir
    try:
        if tok_overrides:
            ex = executor(logs, cfg.cluster, gpu=False, env=env)
            ex.update_parameters(job_name=f"{folder.name}-tok")
            job = ex.submit(run_in_job, overrides + tok_overrides)
            record_jobs(sweep.tokenizer_run, [("cpu", tokenizer_stages(cfg), job)])
            submission["tokenizer_job"] = {"job_id": job.job_id, "log": str(job.paths.stdout)}
            submission["after"] = job.job_id
        for index, res in enumerate(groups):
            members = [r for r in todo if r.group == index]
            if not members:
                continue
            gc = group_cluster(cfg.cluster, res)
            ex = executor(logs, gc, gpu=True, env=env)
            depths = sorted({r.depth for r in members})
            parallelism = min(cfg.sweep_parallelism or len(members), len(members))
            ex.update_parameters(job_name=f"{folder.name}-d{depths[0]}" + (f"-{depths[-1]}" if len(depths) > 1 else ""),
                                 array_parallelism=parallelism)
            if submission["after"]:  # if the tokenizer job fails, Slurm cancels the arrays, not keeps them pending
                ex.update_parameters(dependency=f"afterok:{submission['after']}", additional_parameters={
                    **ex.parameters["additional_parameters"], "kill-on-invalid-dep": "yes"})
            with ex.batch():
                jobs = [ex.submit(run_in_job, overrides + r.overrides) for r in members]
            for run, job in zip(members, jobs):
                record_jobs(sweep.run(run.name), [("gpu", run_stages(cfg), job)])
                run.job = {"job_id": job.job_id, "submitted": submission["time"], "log": str(job.paths.stdout)}
            array = jobs[0].job_id.split("_")[0]  # submitit names an array's elements <array>_<index>
            submission["arrays"].append({
                "job_id": array, "tasks": len(jobs), "runs": [r.name for r in members], "nodes": gc.nodes,
                "gpus_per_node": gc.gpus_per_node, "ranks_per_node": gc.ranks_per_node, "time_min": gc.time_min,
                "parallelism": parallelism,  # an array's log path has %a, Slurm's pattern for the index
                "logs": str(jobs[0].paths.stdout).replace(jobs[0].job_id, f"{array}_%a" if len(jobs) > 1 else array)})
    except FailedJobError as exc:
        tok = submission["tokenizer_job"]
        submitted = " ".join(([tok["job_id"]] if tok else []) + [a["job_id"] for a in submission["arrays"]])
        raise UserError(f"sbatch refused a job of sweep {folder.name} ({str(exc).strip().splitlines()[-1]}); "
                        f"submitted before it: {submitted or 'nothing'} (in the manifest); fix that and run the "
                        f"same command to submit the rest") from None


def _print_submission(cfg, folder, todo, counts, submission, queued) -> None:
    """The contract's lines: one `Submitted array <id> (<n> tasks)` per array first (a group of one run is a
    plain job, as submitit submits it: `Submitted job <id>`), then the details and the commands."""
    plans = {r.name: r.plan for r in todo}
    for array in submission["arrays"]:
        print(f"Submitted array {array['job_id']} ({array['tasks']} tasks)" if array["tasks"] > 1 else
              f"Submitted job {array['job_id']}")
    print(f"sweep {folder.name}: {counts}; submitting {len(todo)}. Manifest: {Sweep(folder).manifest_path}")
    tok = submission["tokenizer_job"]
    if tok:
        print(f"  job {tok['job_id']}: the shared tokenizer ({', '.join(tokenizer_stages(cfg))}, 1 rank); the "
              f"arrays start after it\n    log: {tok['log']}")
    elif submission["after"]:
        print(f"  the arrays start after tokenizer job {submission['after']}, still "
              f"{queued[submission['after']].lower()}")
    for array in submission["arrays"]:
        print(f"  {array['job_id']}: {array['nodes']} node(s) x {array['ranks_per_node']} rank(s), "
              f"{array['time_min']} min limit (then it requeues itself), at most {array['parallelism']} at once")
        for index, name in enumerate(array["runs"]):
            job = f"{array['job_id']}_{index}" if array["tasks"] > 1 else array["job_id"]
            print(f"    {job:<10} {name:<28} {plans[name]['steps']:>7,} steps, "
                  f"{plans[name]['tokens_per_param']:g} tokens/param")
        print(f"    logs: {array['logs']}")
    ids = ([tok["job_id"]] if tok else []) + [a["job_id"] for a in submission["arrays"]]
    print(f"  follow: python -m experiments.status {folder}   |   "
          f"tail -f {submission['arrays'][0]['logs'].replace('%a', '0')}")
    print(f"  cancel: scancel {' '.join(ids)}")


def _write_manifest(folder: Path, cfg, runs: list[SweepRun], stages, tokenizer: Path, old: dict,
                    submission: dict | None) -> None:
    """The sweep's config and runs, merged with what earlier submissions recorded (each run keeps its job
    history; runs no longer in the config keep their entries, as their folders stay)."""
    from omegaconf import OmegaConf

    previous = {e["run_name"]: e for e in old.get("runs", [])}
    entries = []
    for run in runs:
        jobs = previous.pop(run.name, {}).get("jobs", []) + ([run.job] if run.job else [])
        entries.append({"run_name": run.name, "depth": run.depth, "flops_budget": run.budget, "group": run.group,
                        "plan": run.plan, "jobs": jobs})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Sweep(folder).manifest_path, {
        "sweep": folder.name, "kind": cfg.sweep, "depths": cfg.depths, "flops_budgets": cfg.flops_budgets,
        "stages": stages, "tokenizer": str(tokenizer), "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "runs": entries + list(previous.values()),
        "submissions": old.get("submissions", []) + ([submission] if submission else [])})


def print_status(folder: Path) -> int:
    """`python -m experiments.status SWEEP`: one line per run (its current stage, or base_train's figures once
    done) and its latest job's state."""
    from experiments.status import _sacct_states, stage_line

    manifest = read_manifest(folder)
    jobs = {e["run_name"]: last_job(e) for e in manifest["runs"] if last_job(e)}
    queued = queued_jobs()
    finished = _sacct_states([j for j in jobs.values() if j not in queued]) if jobs else {}
    lines, n_done = [], 0
    for entry in manifest["runs"]:
        run, name = Sweep(folder).run(entry["run_name"]), entry["run_name"]
        done = is_done(run, manifest["stages"])
        n_done += done
        stage = "base_train" if done else next(s for s in manifest["stages"] if not run.is_done(s))
        line = (stage_line(run, stage) or f"{stage} not started").strip()
        job = jobs.get(name)
        state = (queued.get(job) or finished.get(job, "?")) if job else ""
        lines.append(f"  {name:<28} {line}" + (f"   [job {job} {state}]" if job else ""))
    print(f"sweep {folder} ({manifest['kind']}): {n_done} of {len(manifest['runs'])} runs done")
    print("\n".join(lines))
    return 0
