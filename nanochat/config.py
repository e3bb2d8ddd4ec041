"""The pipeline's typed configuration. Defaults are upstream nanochat's (GPU-sized); experiments/conf/preset/ holds
the sizes on top: embedded.yaml (the default, a laptop) and gpu.yaml (GPU cluster profiles and experiments).
Registered with Hydra by experiments/, so an override with a typo fails at once with the valid keys.

Base-training keys sit at the top level with upstream's flag names in snake_case; other stages' keys sit under
the stage's name (tok_train.vocab_size)."""

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Optional

from nanochat.stage_table import DEFAULT_STAGES
from nanochat.tokenizer import DEFAULT_VOCAB_SIZE, SPECIAL_TOKENS


# -- what a key may hold, declared beside it and checked when the config is composed (experiments.config), so a
# mistake is one line at the prompt, not a traceback after the queue wait ------------------------------------------
def choice(default: str, *others: str):
    """A key that takes one of these values."""
    return field(default=default, metadata={"choices": (default, *others)})


def at_least(default, low, *, unset=None, multiple_of: int = 1):
    """A number that is at least `low` (and a multiple of `multiple_of`), or exactly `unset` (e.g. -1: derived)."""
    return field(default=default, metadata={"min": low, "unset": unset, "multiple_of": multiple_of})


def matching(default: str, pattern: str, meaning: str):
    return field(default=default, metadata={"pattern": pattern, "meaning": meaning})


def problems(cfg, prefix: str = "") -> list[str]:
    """Every value of a config (nested dataclasses) that breaks its key's declared constraint, one phrase each."""
    found = []
    for f in dataclasses.fields(cfg):
        value, key, rule = getattr(cfg, f.name), prefix + f.name, f.metadata
        if dataclasses.is_dataclass(value):
            found += problems(value, key + ".")
        elif "choices" in rule and value not in rule["choices"]:
            close = difflib.get_close_matches(str(value), rule["choices"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.append(f"{key}={value!r} is not one of {', '.join(map(repr, rule['choices']))}{hint}")
        elif "min" in rule and value != rule["unset"] and (value < rule["min"] or value % rule["multiple_of"]):
            unset = "" if rule["unset"] is None else f" (or {rule['unset']}: derived)"
            even = "" if rule["multiple_of"] == 1 else f" and a multiple of {rule['multiple_of']}"
            found.append(f"{key}={value} must be at least {rule['min']}{even}{unset}")
        elif "pattern" in rule and not re.fullmatch(rule["pattern"], value):
            found.append(f"{key}={value!r} {rule['meaning']}")
    return found


@dataclass
class TokTrainConfig:
    vocab_size: int = at_least(DEFAULT_VOCAB_SIZE, 256 + len(SPECIAL_TOKENS))  # the byte tokens and special ones
    max_chars: int = 2_000_000_000  # characters of training text read (upstream's default)
    doc_cap: int = 10_000  # each document is cut to this many characters, so a few huge ones don't dominate


@dataclass
class TokEvalConfig:
    docs: int = 100  # documents from each split whose compression is measured


@dataclass
class BaseEvalConfig:
    core: str = choice("auto", "required", "off")  # auto: CORE when the eval bundle is staged, else "n/a (not staged)"; required; off
    max_per_task: int = -1  # CORE examples per task; -1: all (upstream's base_eval, the leaderboard); else labelled
    samples: int = 5  # greedy completions of fixed prompts shown in the summary


@dataclass
class FinetuneConfig:
    """sft, and the optional mid_train: the same loop on different conversation mixtures. The defaults are
    upstream's chat_sft at HEAD (schedule, initial learning-rate fraction, mixture)."""
    num_iterations: int = -1  # -1: one epoch of the mixture (its length estimated from a fixed sample)
    max_seq_len: int = -1  # -1: as the base model was trained (upstream inherits these three the same way)
    device_batch_size: int = -1
    total_batch_size: int = -1
    data_shards: int = at_least(0, 0)  # virtual conversation streams; 0 = one per rank (as base_train's data_shards)
    init_lr_frac: float = 0.8  # learning rates start at this fraction of pretraining's
    warmup_ratio: float = 0.0  # share of the steps warming up linearly
    warmdown_ratio: float = 0.5  # share of the steps, at the end, going down linearly to final_lr_frac
    final_lr_frac: float = 0.0
    weight_decay: float = 0.0
    load_optimizer: bool = True  # warm start from the base checkpoint's optimizer state, as upstream (if kept)
    eval_every: int = 150
    eval_tokens: int = 20 * 524288
    chat_eval_every: int = -1  # steps between quick chat evaluations (ARC-Easy, MMLU; chat_eval_examples each)
    chat_eval_examples: int = 100
    mmlu_epochs: int = 3  # the mixture: SmolTalk once, MMLU's auxiliary train set and GSM8K's train set this often
    gsm8k_epochs: int = 4
    simple_spelling: int = 0  # synthetic examples in the mixture (none in upstream's HEAD mixture)
    spelling_bee: int = 0
    arithmetic: int = 0  # generated word problems with calculator calls (the embedded preset's GSM8K stand-in)
    identity_epochs: int = 0  # identity conversations (none at HEAD); sft.identity=FILE alone adds FILE twice
    identity: Optional[str] = None  # a JSONL of conversations to use instead of the shipped identity ones


def midtraining() -> FinetuneConfig:
    """mid_train's defaults: upstream's former midtraining mixture (identity and spelling rows, MMLU once, GSM8K
    twice) at full learning rate, flat then down over the last 20% of the steps."""
    return FinetuneConfig(init_lr_frac=1.0, warmdown_ratio=0.2, mmlu_epochs=1, gsm8k_epochs=2,
                          simple_spelling=200_000, spelling_bee=80_000, identity_epochs=2)


@dataclass
class RlConfig:
    """Policy gradient on GSM8K as upstream: on-policy samples, advantage r - mean(r), token-level mean, no KL."""
    task: str = choice("gsm8k", "arithmetic")
    num_iterations: int = -1  # -1: one epoch of the training task
    examples_per_step: int = 16  # prompts per step, across all ranks
    num_samples: int = 16  # completions per prompt
    device_batch_size: int = 8  # completions per forward pass
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    # RL's own base learning rates, as upstream's chat_rl (not pretraining's 0.3 and 0.008); scalar_lr is
    # upstream's optimizer default. All of them start at init_lr_frac and decay linearly to zero.
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    init_lr_frac: float = 0.05
    eval_every: int = 60
    eval_examples: int = 400  # pass@k is measured on this many validation prompts


@dataclass
class ChatEvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval",
                                                      "SpellingBee"])
    max_examples: int = -1  # per task; -1 = all
    batch_size: int = 8  # prompts per forward pass (categorical tasks)
    num_samples: int = 1
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int = 50
    generated_examples: int = 256  # SpellingBee and Arithmetic test questions (generated: the count is ours)


@dataclass
class Config:
    # -- the run ---------------------------------------------------------------------------------------------
    experiment_name: str = "custom"  # the preset's name; with depth it names the run (e.g. embedded-d4)
    dataset: str = "climbmix"  # embedded | climbmix | fineweb-edu
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    runs_root: Optional[str] = None  # default $NANOCHAT_BASE_DIR/runs
    run_name: Optional[str] = None  # default <experiment_name>-d<depth>
    tokenizer: Optional[str] = None  # a tokenizer folder to use instead of this run's tok_train output
    base_checkpoint: Optional[str] = None  # a base model (ours or upstream's) instead of this run's base_train
    sft_checkpoint: Optional[str] = None  # a chat model for rl and chat_eval_sft instead of this run's sft
    rl_checkpoint: Optional[str] = None  # a chat model for chat_eval_rl instead of this run's rl
    task_data: str = choice("hub", "fixture")  # hub: the chat tasks staged by `python -m tasks.stage`; fixture: the tiny shipped ones
    gpu_hour_price: float = 3.0  # $ per H100-hour on demand (upstream's figure), for the report's cost figure
    device: str = choice("", "cuda", "cpu", "mps")  # empty = autodetect
    nproc: int = at_least(1, 1)  # local processes (one per GPU); 1 on CPU unless testing DDP
    seed: int = 42
    wandb: str = choice("disabled", "offline", "online")
    wandb_project: str = "nanochat"
    # -- model (the depth dial derives the rest) -------------------------------------------------------------
    depth: int = at_least(20, 1)
    aspect_ratio: int = at_least(64, 1)  # model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim
    head_dim: int = at_least(128, 2, multiple_of=2)  # rotary embeddings rotate pairs of channels
    max_seq_len: int = at_least(2048, 1)
    window_pattern: str = matching("SSSL", "[SL]+", "must be letters S and L only (e.g. SSSL)")  # tiled over layers; S = short window (a quarter of the context), L = full
    # -- horizon, in order of precedence: num_iterations > target_flops > target_param_data_ratio ------------
    num_iterations: int = -1
    target_flops: float = -1.0
    target_param_data_ratio: float = 12.0
    # -- batch and optimisation -------------------------------------------------------------------------------
    device_batch_size: int = at_least(32, 1)
    data_shards: int = at_least(0, 0)  # virtual data streams; 0 = one per rank. Fixed, they make a step's rows world-size free
    total_batch_size: int = at_least(-1, 1, unset=-1)  # tokens per step; -1 = from the horizon (~2^19 * (D/D_ref)^0.383)
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.28  # at d12; scaled with batch and horizon
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    fp8: bool = False
    fp8_recipe: str = choice("tensorwise", "rowwise")
    # torch.compile of the training steps; null: on GPU, not on a CPU (nanochat/stages/training.py says why).
    # It changes results (inductor rounds differently)
    compile: Optional[bool] = None
    # the training stages' loss in row chunks, never the whole logits (nanochat/fused_loss.py); false: upstream's
    # plain path, the same losses and weights as upstream's bit for bit (fused: within ~1e-6, another sum order)
    fused_loss: bool = True
    # -- evaluation, sampling, checkpoints --------------------------------------------------------------------
    eval_every: int = 250
    eval_tokens: int = 80 * 524288
    core_metric_every: int = 2000
    core_metric_max_per_task: int = 500
    sample_every: int = 2000
    # steps per logged row (loss averaged over them): the host waits for the GPU only then; 0 = 1 on a CPU, 10 on GPU
    log_every: int = at_least(0, 0)
    save_every: int = -1  # steps; -1 = only at the end (and by time, below)
    save_every_minutes: float = 30.0  # also save when this long has passed: a node that dies silently loses less
    keep_checkpoints: int = 2  # newest complete checkpoints kept while training (at least 2)
    async_save: Optional[bool] = None  # write checkpoints from a background thread; None: on GPU only
    # requeues a stage may take before it stops for good instead of looping: in all, and of each kind
    max_requeues: int = 50
    max_preemptions: int = 50
    max_time_limits: int = 50
    max_node_failures: int = 5  # restarts the ranks did not ask for: a dead node, a hung rank
    # a rank that makes no progress this long exits (code 77) and the job is requeued without dead nodes; 0 = never
    startup_timeout_s: float = 1800.0  # until the first optimizer step: rendezvous, loading, compiling
    # afterwards, between two steps (or two evaluation batches); it also covers the wait for rank 0's checkpoint
    # write (model.pt on top of its optimizer shard) after a rank's own: raise it for a very slow filesystem
    step_timeout_s: float = 600.0
    tok_train: TokTrainConfig = field(default_factory=TokTrainConfig)
    tok_eval: TokEvalConfig = field(default_factory=TokEvalConfig)
    base_eval: BaseEvalConfig = field(default_factory=BaseEvalConfig)
    mid_train: FinetuneConfig = field(default_factory=midtraining)
    sft: FinetuneConfig = field(default_factory=FinetuneConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    chat_eval: ChatEvalConfig = field(default_factory=ChatEvalConfig)


def learning_rates(cfg=Config) -> dict[str, float]:
    """The base learning rates of the optimizer's groups, as build_optimizer takes them (the class: the defaults);
    of a Config (pretraining's) or an RlConfig (RL's own)."""
    return {key: getattr(cfg, key) for key in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")}
