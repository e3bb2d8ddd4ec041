"""The status of a sweep: one line per run."""

from pathlib import Path

from nanochat.runs import Sweep
from nanochat.scheduler import queued_jobs, accounting_states

from experiments.run_status import stage_line
from experiments.sweep.manifest import last_job, read_manifest
from experiments.sweep.plan import is_done


def print_status(folder: Path) -> int:
    """`python -m experiments.status SWEEP`: one line per run (its current stage, or base_train's figures once
    done) and its latest job's state."""
    manifest = read_manifest(folder)
    jobs = {e["run_name"]: last_job(e) for e in manifest["runs"] if last_job(e)}
    queued = queued_jobs() or {}  # None (squeue did not answer): sacct's states, else '?'
    finished = (accounting_states([j for j in jobs.values() if j not in queued]) or {}) if jobs else {}
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
    kind = manifest["kind"]
    if kind == "multirun":  # its runs' names say their values; the header, which keys
        kind += f" of {' x '.join(axis['key'] for axis in manifest['axes'])}"
    print(f"sweep {folder} ({kind}): {n_done} of {len(manifest['runs'])} runs done")
    print("\n".join(lines))
    return 0
