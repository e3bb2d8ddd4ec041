"""python -m experiments.status RUN: where a run stands: each stage, its step and ETA, requeues, and its jobs.

RUN is a run folder or a run name under runs_root ($NANOCHAT_BASE_DIR/runs by default), or a sweep's folder."""

import subprocess
import sys
import time

from nanochat.runs import STAGES, Run, Sweep, find_run


def stage_line(run: Run, stage: str) -> str | None:
    if run.is_done(stage):
        summary = run.read_summary(stage)
        figures = ", ".join(f"{k} {summary[k]:.4g}" for k in ("val_bpb", "core_metric", "chatcore")
                            if isinstance(summary.get(k), (int, float)))
        requeues = f", {summary['requeues']} requeue(s)" if summary.get("requeues") else ""
        return f"  {stage:<14} done{': ' + figures if figures else ''}{requeues}"
    rows = [r for r in run.metrics(stage).read() if "dt" in r]
    if not rows:
        return f"  {stage:<14} started" if run.stage_dir(stage).is_dir() else None
    last = rows[-1]
    from nanochat.checkpoint import latest_meta  # imports torch: only for a stage in progress

    meta = latest_meta(run.checkpoints_dir(stage))
    total = meta.get("num_iterations") or _config_iterations(run)
    recent = [r["dt"] for r in rows[-20:]]
    eta = f", eta {(total - last['step']) * sum(recent) / len(recent) / 60:.0f} min" if total else ""
    age = time.time() - last.get("wall", time.time())
    requeues = meta.get("counters", {}).get("requeues", 0)
    return (f"  {stage:<14} step {last['step']}{'/' + str(total) if total else ''}, loss {last['loss']:.4f}{eta}, "
            f"last logged {age / 60:.0f} min ago, {requeues} requeue(s)")


def _config_iterations(run: Run):
    """num_iterations from the run's config.yaml when it was set explicitly (else the horizon is derived)."""
    if not run.config_path.is_file():
        return None
    from omegaconf import OmegaConf

    value = OmegaConf.load(run.config_path).get("num_iterations", -1)
    return value if value and value > 0 else None


def job_lines(run: Run) -> list[str]:
    jobs = run.jobs()
    if not jobs:
        return []
    states = _sacct_states([j["job_id"] for j in jobs])
    return [f"  job {j['job_id']:<10} {states.get(j['job_id'], '?'):<11} {', '.join(j['stages'])}   log {j['stdout']}"
            for j in jobs]


def _sacct_states(ids: list[str]) -> dict:
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m experiments.status RUN_FOLDER_OR_NAME", file=sys.stderr)
        return 2
    run = find_run(args[0])
    if not run.root.is_dir():
        print(f"error: no run folder {run.root}", file=sys.stderr)
        return 2
    if Sweep(run.root).is_sweep():  # a sweep folder: one line per run
        from experiments.sweep import print_status

        return print_status(run.root)
    print(f"run {run.root}")
    for stage in STAGES:
        line = stage_line(run, stage)
        if line:
            print(line)
    for line in job_lines(run):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
