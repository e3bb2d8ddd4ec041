"""One run's status lines: each stage (done with its figures, or its step, ETA and requeues) and its jobs' states.
Shared by `python -m experiments.status RUN` and the status of a sweep, one line per run."""

import time

from nanochat.preemption import KINDS
from nanochat.runs import Run
from nanochat.scheduler import accounting_states


def stage_line(run: Run, stage: str) -> str | None:
    if run.is_done(stage):
        summary = run.read_summary(stage)
        figures = ", ".join(f"{k} {summary[k]:.4g}" for k in ("val_bpb", "core_metric", "chatcore")
                            if isinstance(summary.get(k), (int, float)))
        requeues = f", {requeue_words(summary)}" if summary.get("requeues") else ""
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
    return (f"  {stage:<14} step {last['step']}{'/' + str(total) if total else ''}, loss {last['loss']:.4f}{eta}, "
            f"last logged {age / 60:.0f} min ago, {requeue_words(meta.get('counters', {}))}")


def requeue_words(counts: dict) -> str:
    """'3 requeue(s): 1 preemption(s), 2 time limit(s)', from a summary's or checkpoint's counters."""
    kinds = [f"{counts[k]} {k[:-1].replace('_', ' ')}(s)" for k in KINDS if counts.get(k)]
    return f"{counts.get('requeues', 0)} requeue(s)" + (f": {', '.join(kinds)}" if kinds else "")


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
    states = accounting_states([j["job_id"] for j in jobs]) or {}  # None (sacct did not answer): '?'
    return [f"  job {j['job_id']:<10} {states.get(j['job_id'], '?'):<11} {', '.join(j['stages'])}   log {j['stdout']}"
            for j in jobs]
