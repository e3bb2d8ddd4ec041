"""The pipeline's typed configuration. Defaults are upstream nanochat's (GPU-sized); experiments/conf/config.yaml
is the embedded preset that runs on a laptop, and cluster presets override it. Registered with Hydra by
experiments/, so an override with a typo fails at once with the valid keys."""

from dataclasses import dataclass, field
from typing import Optional

from nanochat.runs import STAGES
from nanochat.tokenizer import DEFAULT_VOCAB_SIZE


@dataclass
class TokTrainConfig:
    vocab_size: int = DEFAULT_VOCAB_SIZE
    max_chars: int = 2_000_000_000  # characters of training text read (upstream's default)
    doc_cap: int = 10_000  # each document is cut to this many characters, so a few huge ones don't dominate


@dataclass
class TokEvalConfig:
    docs: int = 100  # documents from each split whose compression is measured


@dataclass
class Config:
    experiment_name: str = "custom"  # the preset's name; with depth it names the run (e.g. embedded-d4)
    dataset: str = "climbmix"  # embedded | climbmix | fineweb-edu
    depth: int = 20
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    runs_root: Optional[str] = None  # default $NANOCHAT_BASE_DIR/runs
    run_name: Optional[str] = None  # default <experiment>-d<depth>
    tokenizer: Optional[str] = None  # a tokenizer folder to use instead of this run's tok_train output
    tok_train: TokTrainConfig = field(default_factory=TokTrainConfig)
    tok_eval: TokEvalConfig = field(default_factory=TokEvalConfig)
