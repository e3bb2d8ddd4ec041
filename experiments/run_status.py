"""One run's status lines: each stage (done with its figures, or its step, ETA and requeues), the pipeline's ETA and
its jobs' states. Shared by `python -m experiments.status`, for one run or for every run under runs_root, and by
the status of a sweep, one line per run."""

import time
from dataclasses import dataclass

from nanochat import lease
from nanochat.preemption import KINDS
from nanochat.runs import Run
from nanochat.scheduler import FINAL_STATES, accounting_states
from nanochat.stage_table import DEFAULT_STAGES


@dataclass(frozen=True)
class Progress:
    """A training stage in progress, from its metrics.jsonl and newest checkpoint."""
    step: int
    total: int | None  # planned steps; None when neither a checkpoint nor config.yaml says
    step_s: float  # mean time of the last 20 steps
    loss: float
    age_s: float  # since the last logged step
    counters: dict  # restarts by kind, from the checkpoint

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.step) * self.step_s if self.total else None


def progress(run: Run, stage: str) -> Progress | None:
    """None for a stage that logged no step (not started, or an evaluation stage)."""
    rows = [r for r in run.metrics(stage).read() if "dt" in r]
    if not rows:
        return None
    from nanochat.checkpoint import latest_meta  # imports torch: only for a stage in progress

    meta, last = latest_meta(run.checkpoints_dir(stage)), rows[-1]
    recent = [r["dt"] for r in rows[-20:]]
    return Progress(step=last["step"], total=meta.get("num_iterations") or _config(run).get("num_iterations"),
                    step_s=sum(recent) / len(recent), loss=last["loss"],
                    age_s=time.time() - last.get("wall", time.time()), counters=meta.get("counters", {}))


def stage_line(run: Run, stage: str) -> str | None:
    if run.is_done(stage):
        summary = run.read_summary(stage)
        figures = ", ".join(f"{k} {summary[k]:.4g}" for k in ("val_bpb", "core_metric", "chatcore")
                            if isinstance(summary.get(k), (int, float)))
        requeues = f", {requeue_words(summary)}" if summary.get("requeues") else ""
        return f"  {stage:<14} done{': ' + figures if figures else ''}{requeues}{ranks_words(summary)}"
    now = progress(run, stage)
    if now is None:
        return f"  {stage:<14} started" if run.stage_dir(stage).is_dir() else None
    eta = f", eta {minutes(now.eta_s)}" if now.eta_s is not None else ""
    return (f"  {stage:<14} step {now.step}{'/' + str(now.total) if now.total else ''}, loss {now.loss:.4f}{eta}, "
            f"last logged {now.age_s / 60:.0f} min ago, {requeue_words(now.counters)}{ranks_words(now.counters)}")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def requeue_words(counts: dict) -> str:
    """'3 requeue(s): 1 preemption(s), 2 time limit(s)', from a summary's or checkpoint's counters."""
    kinds = [f"{counts[k]} {k[:-1].replace('_', ' ')}(s)" for k in KINDS if counts.get(k)]
    return f"{counts.get('requeues', 0)} requeue(s)" + (f": {', '.join(kinds)}" if kinds else "")


def ranks_words(counts: dict) -> str:
    """', on 2 ranks, 4 from step 120' when a stage was resumed on another number of ranks (a summary's or a
    checkpoint's world_sizes: [first step, ranks] each); nothing when it ran on one number throughout."""
    history = counts.get("world_sizes") or []
    if len(history) < 2:
        return ""
    return f", on {history[0][1]} ranks, " + ", ".join(f"{ranks} from step {step}" for step, ranks in history[1:])


def _config(run: Run) -> dict:
    """The keys of the run's config.yaml that status reads: `stages`, `depth`, and `num_iterations` when it was
    set explicitly (else the horizon is derived at run time)."""
    if not run.config_path.is_file():
        return {}
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run.config_path)
    iterations, stages = saved.get("num_iterations", -1), saved.get("stages")
    return {"stages": None if stages is None else list(stages), "depth": saved.get("depth"),
            "num_iterations": iterations if iterations and iterations > 0 else None}


def planned_stages(run: Run) -> list[str]:
    """The stages the run's command asked for (config.yaml), else the default pipeline."""
    stages = _config(run).get("stages")
    return list(DEFAULT_STAGES) if stages is None else stages


def todo_stages(run: Run) -> list[str]:
    return [s for s in planned_stages(run) if not run.is_done(s)]


def pipeline_line(run: Run) -> str:
    """How far the whole pipeline is and how long it has left: the stage in progress from its steps and step
    time; a later stage's steps are only known once it starts (sft's epoch, say), so it is timed by the same stage
    of a finished run of the same depth beside this one (a depth miniseries, an earlier attempt), else counted."""
    stages, todo = planned_stages(run), todo_stages(run)
    if not todo:
        return f"  pipeline       done: {len(stages)} of {len(stages)} stages"
    now = progress(run, todo[0])
    if now is None or now.eta_s is None:
        return (f"  pipeline       {len(stages) - len(todo)} of {len(stages)} stages done; eta: {todo[0]} not timed "
                f"yet" + (f", then {len(todo) - 1} more stage(s)" if len(todo) > 1 else ""))
    timed, untimed, total = [f"{todo[0]} {minutes(now.eta_s)}"], 0, now.eta_s
    peers = same_depth_runs(run)  # read once, not once per stage
    for stage in todo[1:]:
        seen = time_elsewhere(peers, stage)
        if seen is None:
            untimed += 1
            continue
        total += seen[0]
        timed.append(f"{stage} {minutes(seen[0])} as in {seen[1]}")
    rest = f", and {untimed} stage(s) not timed until they start" if untimed else ""
    return (f"  pipeline       {len(stages) - len(todo)} of {len(stages)} stages done; eta: {minutes(total)} "
            f"({', then '.join(timed)}){rest}")


def same_depth_runs(run: Run) -> list[Run]:
    """The other runs beside `run` (same runs_root) of its depth."""
    depth, peers = _config(run).get("depth"), []
    for config in run.root.parent.glob("*/config.yaml"):
        other = Run(config.parent)
        try:
            if other.root != run.root and _config(other).get("depth") == depth:
                peers.append(other)
        except Exception:  # noqa: BLE001  a neighbour's unreadable config.yaml is not this run's status
            continue
    return peers


def time_elsewhere(peers: list[Run], stage: str) -> tuple[float, str] | None:
    """(seconds, run name): how long `stage` took in the run of `peers` that finished it last; None when none did."""
    best = None
    for other in peers:
        if not other.is_done(stage):
            continue
        wall, when = other.read_summary(stage).get("wall_time_s"), other.summary_path(stage).stat().st_mtime
        if isinstance(wall, (int, float)) and (best is None or when > best[0]):
            best = (when, wall, other.root.name)
    return None if best is None else best[1:]


def finished(run: Run, states: dict[str, str]) -> bool:
    """Nothing left to watch: every planned stage is done, or nothing works on the run any more (its jobs have
    all ended; a run without jobs: no live process holds its lease)."""
    if not todo_stages(run):
        return True
    if run.jobs():
        return all(states.get(j["job_id"], "?").split()[0] in FINAL_STATES for j in run.jobs())
    held = lease.read(run.lease_path)
    return held is None or lease.gone(held) is not None


def job_states(runs: list[Run]) -> dict[str, str]:
    """Every job of these runs -> its state (one sacct call); '?' where sacct did not answer."""
    ids = [j["job_id"] for run in runs for j in run.jobs()]
    states = (accounting_states(ids) if ids else {}) or {}
    return {job_id: states.get(job_id, "?") for job_id in ids}


def job_lines(run: Run, states: dict[str, str]) -> list[str]:
    return [f"  job {j['job_id']:<10} {states.get(j['job_id'], '?'):<11} {', '.join(j['stages'])}   "
            f"log {j.get('stderr', j['stdout'])}" for j in run.jobs()]


def summary_line(run: Run, states: dict[str, str]) -> str:
    """One line for the list of all runs: done, or the stage in progress (step, ETA) and its latest job's state."""
    stages, todo = planned_stages(run), todo_stages(run)
    if not todo:
        return f"{run.root.name:<28} done ({len(stages)} stages)"
    line = (stage_line(run, todo[0]) or f"{todo[0]} not started").strip()
    jobs = [j for j in run.jobs() if todo[0] in j["stages"]]
    job = f"   [job {jobs[-1]['job_id']} {states.get(jobs[-1]['job_id'], '?')}]" if jobs else ""
    return f"{run.root.name:<28} {len(stages) - len(todo)}/{len(stages)} done, {line}{job}"
