"""manifest.json, the sweep's record: its config, its runs with their planned horizons, every submission and
each run's jobs; rewritten atomically on each submission."""

import json
from pathlib import Path

from nanochat.common import atomic_write_json
from nanochat.runs import Sweep

from experiments.sweep.plan import SweepRun


def read_manifest(folder: Path) -> dict:
    path = Sweep(folder).manifest_path
    return json.loads(path.read_text()) if path.is_file() else {}


def last_job(entry: dict | None) -> str | None:
    return entry["jobs"][-1]["job_id"] if entry and entry.get("jobs") else None


def last_tokenizer_job(manifest: dict) -> str | None:
    jobs = [s["tokenizer_job"]["job_id"] for s in manifest.get("submissions", []) if s.get("tokenizer_job")]
    return jobs[-1] if jobs else None


def write_manifest(folder: Path, cfg, kind: str, axes: dict, runs: list[SweepRun], stages, tokenizer: Path,
                   old: dict, submission: dict | None) -> None:
    """The sweep's config, its axes and runs, merged with what earlier submissions recorded (each run keeps its
    job history; runs no longer in the config keep their entries, as their folders stay)."""
    from omegaconf import OmegaConf

    previous = {e["run_name"]: e for e in old.get("runs", [])}
    entries = []
    for run in runs:
        jobs = previous.pop(run.name, {}).get("jobs", []) + ([run.job] if run.job else [])
        budget = run.cfg.target_flops if run.cfg.target_flops > 0 else None
        entries.append({"run_name": run.name, "values": run.values, "depth": run.depth, "flops_budget": budget,
                        "group": run.group, "plan": run.plan, "jobs": jobs})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Sweep(folder).manifest_path, {
        "sweep": folder.name, "kind": kind, "depths": cfg.depths, "flops_budgets": cfg.flops_budgets,
        "axes": [{"key": key, "values": values} for key, values in axes.items()],  # in order: JSON's keys are sorted
        "stages": stages, "tokenizer": str(tokenizer), "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "runs": entries + list(previous.values()),
        "submissions": old.get("submissions", []) + ([submission] if submission else [])})
