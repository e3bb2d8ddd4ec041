"""Submitting a sweep (one job array per resource group, after the tokenizer job), or running it here: only the
runs that are neither done nor still queued or running."""

import time

from nanochat.common import UserError
from nanochat.runs import Sweep
from nanochat.scheduler import queued_jobs

from experiments.sweep.manifest import last_job, last_tokenizer_job, read_manifest, write_manifest
from experiments.sweep.multirun import axis_overrides
from experiments.sweep.plan import CLEARED, group_cluster, is_done, plan_sweep, run_stages, tokenizer_stages


def launch_sweep(cfg, overrides: list[str], resume_changed: bool, multirun: dict | None = None) -> None:
    """`python -m experiments.launch +experiment=isoflop [+cluster=NAME] ...`, or `-m key=a,b ...` (`multirun`:
    the swept keys' values; `overrides`: the rest): submit (or run here) what is left."""
    from experiments.config import load_config
    from experiments.pipeline import prepare_run
    from experiments.resume_guard import split_resume_flag

    schema_overrides, _ = split_resume_flag(overrides)
    plan = plan_sweep(cfg, schema_overrides, multirun)
    folder, kind, axes, groups, tokenizer, runs = (plan.folder, plan.kind, plan.axes, plan.groups, plan.tokenizer,
                                                   plan.runs)
    tok_run = Sweep(folder).tokenizer_run
    manifest = read_manifest(folder)
    if manifest and manifest["kind"] != kind:  # one folder, one kind: its status and analysis read them alike
        raise UserError(f"{folder} holds a sweep of kind {manifest['kind']}; give this {kind} sweep another run_name")
    previous = {e["run_name"]: e for e in manifest.get("runs", [])}
    queued = queued_jobs() if cfg.cluster else {}
    if queued is None:  # fail closed: read as "nothing queued", it would submit every run a second time
        raise UserError(f"squeue did not answer, so which runs of sweep {folder.name} are still queued or running "
                        f"is unknown; submitted nothing: run the same command again once `squeue` works")
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
    for run in todo:  # every run's config is checked against its folder (and its lease) before anything starts
        prepare_run(run.cfg, resume_changed, submitting=cfg.cluster is not None)
    if cfg.cluster is None:
        write_manifest(folder, cfg, kind, axes, runs, stages, tokenizer, manifest, submission=None)
        print(f"{counts}; running {len(todo)} here, one after another")
        _run_here(overrides, tok_overrides, todo, resume_changed)
        return
    argv = ["-m", *overrides, *axis_overrides(multirun)] if multirun else overrides
    submission = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": argv, "tokenizer_job": None,
                  "after": queued_tok if queued_tok in queued else None, "arrays": []}
    try:
        _submit(cfg, overrides, folder, groups, tok_overrides, todo, submission)
    finally:  # also after a refused sbatch: what was submitted is recorded, and a rerun submits the rest
        if submission["tokenizer_job"] or submission["arrays"]:
            write_manifest(folder, cfg, kind, axes, runs, stages, tokenizer, manifest, submission)
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
    from experiments.slurm import after_success, executor, job_env, record_jobs

    sweep = Sweep(folder)
    env, logs = job_env(cfg), sweep.slurm_dir
    try:
        if tok_overrides:
            ex = executor(logs, cfg.cluster, gpu=False, env=env)
            ex.update_parameters(job_name=f"{folder.name}-tok")
            job = ex.submit(run_in_job, overrides + tok_overrides)
            record_jobs(sweep.tokenizer_run, [("cpu", tokenizer_stages(cfg), job)])
            submission["tokenizer_job"] = {"job_id": job.job_id, "log": str(job.paths.stdout),
                                           "errors": str(job.paths.stderr)}
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
            if submission["after"]:
                after_success(ex, submission["after"])
            with ex.batch():
                jobs = [ex.submit(run_in_job, overrides + r.overrides) for r in members]
            for run, job in zip(members, jobs):
                record_jobs(sweep.run(run.name), [("gpu", run_stages(cfg), job)])
                run.job = {"job_id": job.job_id, "submitted": submission["time"], "log": str(job.paths.stdout)}
            array = jobs[0].job_id.split("_")[0]  # submitit names an array's elements <array>_<index>
            # an array's log paths have %a, Slurm's pattern for the index
            pattern = f"{array}_%a" if len(jobs) > 1 else array
            submission["arrays"].append({
                "job_id": array, "tasks": len(jobs), "runs": [r.name for r in members], "nodes": gc.nodes,
                "gpus_per_node": gc.gpus_per_node, "ranks_per_node": gc.ranks_per_node, "time_min": gc.time_min,
                "parallelism": parallelism, "logs": str(jobs[0].paths.stdout).replace(jobs[0].job_id, pattern),
                "errors": str(jobs[0].paths.stderr).replace(jobs[0].job_id, pattern)})
    except FailedJobError as exc:
        tok = submission["tokenizer_job"]
        submitted = " ".join(([tok["job_id"]] if tok else []) + [a["job_id"] for a in submission["arrays"]])
        raise UserError(f"sbatch refused a job of sweep {folder.name} ({str(exc).strip().splitlines()[-1]}); "
                        f"submitted before it: {submitted or 'nothing'} (in the manifest); fix that and run the "
                        f"same command to submit the rest") from None


def _print_submission(cfg, folder, todo, counts, submission, queued) -> None:
    """The contract's lines: one `Submitted array <id> (<n> tasks)` per array first (a group of one run is a
    plain job, as submitit submits it: `Submitted job <id>`), then the details and the commands."""
    from experiments.slurm import log_files

    plans = {r.name: r.plan for r in todo}
    for array in submission["arrays"]:
        print(f"Submitted array {array['job_id']} ({array['tasks']} tasks)" if array["tasks"] > 1 else
              f"Submitted job {array['job_id']}")
    print(f"sweep {folder.name}: {counts}; submitting {len(todo)}. Manifest: {Sweep(folder).manifest_path}")
    tok = submission["tokenizer_job"]
    if tok:
        print(f"  job {tok['job_id']}: the shared tokenizer ({', '.join(tokenizer_stages(cfg))}, 1 rank); the "
              f"arrays start after it\n    log: {log_files(tok['errors'], tok['log'])}")
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
        print(f"    logs: {log_files(array['errors'], array['logs'])}")
    ids = ([tok["job_id"]] if tok else []) + [a["job_id"] for a in submission["arrays"]]
    print(f"  follow: python -m experiments.status {folder}   |   "
          f"tail -f {submission['arrays'][0]['logs'].replace('%a', '0')}")
    print(f"  cancel: scancel {' '.join(ids)}")
