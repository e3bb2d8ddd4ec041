"""Pipeline stages. Each module has `run(cfg: Config, run: Run) -> dict`; the returned dict becomes the stage's
summary.json, which the pipeline writes last."""

import importlib

from nanochat.common import UserError
from nanochat.runs import Run
from nanochat.tokenizer import Tokenizer

IMPLEMENTED = ["tok_train", "tok_eval", "base_train", "base_eval"]  # grows as stages land; the order is the pipeline's


def stage_runner(name: str):
    return importlib.import_module(f"nanochat.stages.{name}").run


def load_tokenizer(cfg, run: Run) -> Tokenizer:
    """This run's tokenizer, or the folder named by `tokenizer=` (ours or upstream nanochat's)."""
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if not (run.tokenizer_dir / "tokenizer.pkl").is_file():
        raise UserError(f"run {run.root.name} has no tokenizer: run the tok_train stage first "
                        f"(stages=[tok_train,...]) or pass tokenizer=PATH")
    return Tokenizer.load(run.tokenizer_dir)
