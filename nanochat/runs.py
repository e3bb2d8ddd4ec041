"""The run folder: the one module that knows its layout (see CONTRACT.md).

    <runs_root>/<run_name>/
        config.yaml
        <stage>/checkpoints/  metrics.jsonl  summary.json (written last, atomically: present = stage done)
        report.md
"""

import json
import time
from pathlib import Path

from nanochat.common import atomic_write_json, get_base_dir
from nanochat.stage_table import STAGES


def default_runs_root() -> Path:
    return get_base_dir() / "runs"


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
    def report_path(self) -> Path:
        return self.root / "report.md"

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

        rows = [row for row in self.read() if keep(row)]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
