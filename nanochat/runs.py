"""The run folder: the one module that knows its layout (README: "Where outputs go").

    <runs_root>/<run_name>/
        config.yaml
        lease.json        while a process trains or evaluates here: who (nanochat.lease; one writer per run)
        <stage>/checkpoints/  metrics.jsonl  summary.json (written last, atomically: present = stage done)
        report.md
        slurm/jobs.jsonl  the jobs submitted for the run (one JSON object a line), beside their logs
    <runs_root>/<sweep>/
        manifest.json     the sweep's config, runs and submissions
        tokenizer/        the shared tokenizer's run folder
        <run_name>/       one run folder per run
        slurm/            the jobs' logs

runs_root is, first found: the config's runs_root, the cluster profile's, $NANOCHAT_BASE_DIR/runs.
"""

import json
import os
import time
from pathlib import Path

from nanochat.common import atomic_write_json, get_base_dir
from nanochat.stage_table import STAGES


def resolve_runs_root(runs_root=None, cluster_runs_root=None) -> Path:
    """Where run folders live: the config's runs_root, else the cluster profile's, else $NANOCHAT_BASE_DIR/runs.
    Plain values, not the config: nanochat/ does not know the launcher's config classes. Shell variables in it
    ("/scratch/$USER/runs") are expanded, the same on the login node and in the job."""
    root = runs_root or cluster_runs_root
    return Path(os.path.expandvars(root)) if root else get_base_dir() / "runs"


def find_run(name_or_path, runs_root=None) -> "Run | None":
    """A run given as a folder or as a name under runs_root; None: the newest run there (None if there is none).
    The folder may not exist: callers say so in their own words."""
    if name_or_path is None:
        return Run.newest(resolve_runs_root(runs_root))
    path = Path(name_or_path)
    return Run(path if path.is_dir() else resolve_runs_root(runs_root) / name_or_path)


def read_jsonl(path) -> list[dict]:
    """JSON lines written by another process; a torn last line (it was killed mid-write) is skipped, not fatal."""
    path, rows = Path(path), []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


class Run:
    def __init__(self, root):
        self.root = Path(root)

    @classmethod
    def newest(cls, runs_root) -> "Run | None":
        """The run whose config was written last (what chat commands use without --run)."""
        configs = sorted(Path(runs_root).glob("*/config.yaml"), key=lambda p: p.stat().st_mtime)
        return cls(configs[-1].parent) if configs else None

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lease_path(self) -> Path:
        """The lease of the process that writes in this run now (nanochat.lease)."""
        return self.root / "lease.json"

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"

    @property
    def slurm_dir(self) -> Path:
        """The run's job logs and jobs.jsonl."""
        return self.root / "slurm"

    @property
    def jobs_path(self) -> Path:
        return self.slurm_dir / "jobs.jsonl"

    def jobs(self) -> list[dict]:
        """The jobs submitted for this run, oldest first: {"job_id", "kind", "stages", "stdout", ...} each."""
        return read_jsonl(self.jobs_path)

    @property
    def tokenizer_dir(self) -> Path:
        return self.stage_dir("tok_train") / "tokenizer"

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        return self.root / stage

    def checkpoints_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def summary_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "summary.json"

    def is_done(self, stage: str) -> bool:
        return self.summary_path(stage).is_file()

    def read_summary(self, stage: str) -> dict:
        return json.loads(self.summary_path(stage).read_text())

    def write_summary(self, stage: str, summary: dict) -> None:
        atomic_write_json(self.summary_path(stage), summary)

    def metrics(self, stage: str) -> "MetricsLog":
        return MetricsLog(self.stage_dir(stage) / "metrics.jsonl")


class MetricsLog:
    """Append-only JSON lines, one object per logged step; each line is flushed so a kill loses at most one."""

    def __init__(self, path):
        self.path = Path(path)

    def log(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({**row, "wall": time.time()}) + "\n")

    def rewind(self, keep) -> None:
        """Keep only the rows for which keep(row) is true (a resumed stage drops what it will log again)."""
        from nanochat.common import atomic_write_text

        if not self.path.is_file():
            return
        rows = [row for row in self.read() if keep(row)]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))

    def read(self) -> list[dict]:
        return read_jsonl(self.path)


class Sweep:
    """A sweep's folder: a manifest beside ordinary run folders (experiments/sweep/ plans and submits them)."""

    def __init__(self, root):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    @property
    def tokenizer_run(self) -> Run:
        """The run that trains the tokenizer every run of the sweep shares."""
        return self.run("tokenizer")

    def run(self, name: str) -> Run:
        return Run(self.root / name)

    def is_sweep(self) -> bool:
        return self.manifest_path.is_file()
