"""Experiment tracking: wandb, optional (the progress shown while a stage runs is nanochat/progress.py)."""

import dataclasses
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
        if config.get("cluster"):  # its setup lines and environment may hold tokens: the profile's name only
            config["cluster"] = config["cluster"]["name"]
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

