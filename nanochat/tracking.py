"""Experiment tracking (wandb, optional) and a terminal progress line with ETA."""

import dataclasses
import sys
import time
import uuid

from nanochat.common import UserError


class Tracker:
    """wandb when cfg.wandb is "offline" or "online" (rank 0 only); "disabled" never imports it. The wandb run
    id lives in the run folder, so a resumed or requeued stage keeps logging into the same wandb run."""

    def __init__(self, cfg, run, stage: str, rank: int):
        self.wandb_run = None
        if cfg.wandb == "disabled" or rank != 0:
            return
        try:
            import wandb
        except ImportError:
            raise UserError("wandb is not installed: pip install -e '.[wandb]', or wandb=disabled") from None
        id_file = run.stage_dir(stage) / "wandb_id"
        if not id_file.is_file():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(uuid.uuid4().hex[:12])
        # one wandb run per stage, grouped by the run folder's name, with the whole resolved config
        config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
        self.wandb_run = wandb.init(project=cfg.wandb_project, name=f"{run.root.name}/{stage}", group=run.root.name,
                                    job_type=stage, id=id_file.read_text().strip(), resume="allow", mode=cfg.wandb,
                                    dir=str(run.stage_dir(stage)), config={**config, "stage": stage})

    def log(self, row: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=row["step"])

    def finish(self, summary: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb_run.finish()


def record_summary(cfg, run, stage: str, rank: int, summary: dict) -> None:
    """An evaluation stage's figures (CORE, ChatCORE, each task's accuracy) as its wandb run's summary."""
    Tracker(cfg, run, stage, rank).finish(summary)


class Progress:
    """On a terminal: one line redrawn in place with an ETA. Otherwise (Slurm logs): a plain line every
    `every` steps, so logs stay readable."""

    def __init__(self, total: int, enabled: bool = True, every: int = 10):
        self.total, self.enabled, self.every = total, enabled, every
        self.tty = sys.stdout.isatty()
        self.start = time.time()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / step * (self.total - step) if step else 0.0
        line = f"step {step:05d}/{self.total:05d} ({100 * step / self.total:.1f}%) | {text} | eta {eta / 60:.1f}m"
        if self.tty:
            print("\r" + line, end="", flush=True)
        elif step % self.every == 0 or step == self.total or step == 1:
            print(line, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print()
