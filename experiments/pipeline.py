"""Run the pipeline's stages in order in one run folder, skipping those already done."""

from pathlib import Path

from nanochat.common import atomic_write_text, print0
from nanochat.config import Config
from nanochat.runs import STAGES, Run, default_runs_root
from nanochat.stages import IMPLEMENTED, stage_runner

from experiments.config import to_yaml


def run_folder(cfg: Config) -> Run:
    root = Path(cfg.runs_root) if cfg.runs_root else default_runs_root()
    return Run(root / (cfg.run_name or f"{cfg.experiment_name}-d{cfg.depth}"))


def run_pipeline(cfg: Config) -> Run:
    run = run_folder(cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.config_path, to_yaml(cfg))
    print0(f"run folder: {run.root}")
    for stage in (s for s in STAGES if s in cfg.stages):
        if stage not in IMPLEMENTED:
            print0(f"[{stage}] not implemented yet, skipped")
            continue
        if run.is_done(stage):
            print0(f"[{stage}] done already (summary.json present), skipped")
            continue
        print0(f"[{stage}] starting")
        run.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        run.write_summary(stage, stage_runner(stage)(cfg, run))
    return run
