"""The depth dial: from `depth` (and the horizon keys) to every size and hyperparameter of a base-training run.

As upstream computes it: width = depth * 64 rounded up to a multiple of head_dim (128), one head per 128 dims;
horizon from num_iterations > target_flops > target_param_data_ratio (tokens = ratio * scaling params); total
batch from the horizon, B = 2^19 * (D / D_ref)^0.383 (Power Lines) rounded to a power of 2, with d12 as the
reference; LRs scaled by sqrt(B / B_ref); weight decay by sqrt(B / B_ref) * D_ref / D (constant T_epoch).
Every derived value can be overridden by its config key, and `TrainPlan.describe()` is logged at start. The
per-step schedules (LR warmup/warmdown, Muon momentum and weight decay) are nanochat.optim's.

Torch-free (the counts are nanochat.model_config's closed forms): the login node plans a run at submission.
"""

import math
from dataclasses import asdict, dataclass

from nanochat.common import UserError
from nanochat.model_config import GPTConfig, flops_per_token, model_config_for_depth, param_counts

B_REF = 2**19  # tokens per step found best at d12
REF_DEPTH = 12


@dataclass(frozen=True)
class TrainPlan:
    model: GPTConfig
    params_total: int
    params_non_embedding: int
    params_scaling: int  # transformer matrices + lm_head: what upstream's scaling laws use
    flops_per_token: float
    total_batch_size: int
    num_iterations: int
    horizon_from: str
    grad_accum_steps: int
    batch_lr_scale: float
    weight_decay: float  # scaled; schedules.muon_weight_decay decays it to 0 with a cosine
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations

    def describe(self) -> str:
        rows = {**{k: v for k, v in asdict(self).items() if k != "model"}, **asdict(self.model),
                "total_tokens": self.total_tokens, "tokens_per_scaling_param": self.total_tokens / self.params_scaling,
                "total_flops": self.flops_per_token * self.total_tokens}
        return "\n".join(f"  {k:<26}{v:,}" if isinstance(v, int) else f"  {k:<26}{v}" for k, v in rows.items())


def model_config(cfg, vocab_size: int, depth: int | None = None) -> GPTConfig:
    """The model of the config's keys (at `depth`, default the config's)."""
    return model_config_for_depth(depth or cfg.depth, vocab_size, cfg.max_seq_len, head_dim=cfg.head_dim,
                                  aspect_ratio=cfg.aspect_ratio, window_pattern=cfg.window_pattern)


def plan(cfg, vocab_size: int, world_size: int) -> TrainPlan:
    """`cfg` carries the top-level base-training keys of nanochat.config.Config."""
    model_cfg = model_config(cfg, vocab_size)
    counts, token_flops = param_counts(model_cfg), flops_per_token(model_cfg)
    n_scaling = counts["scaling"]
    ratio = cfg.target_param_data_ratio
    ref_ratio = ratio if ratio > 0 else 12.0  # the reference horizon is defined at a ratio even when unused
    d_ref = ref_ratio * param_counts(model_config(cfg, vocab_size, REF_DEPTH))["scaling"]
    target_tokens = int(ref_ratio * n_scaling)  # an int, and the weight decay below grouped, as upstream's

    total_batch = cfg.total_batch_size
    if total_batch <= 0:
        total_batch = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))
    if cfg.num_iterations > 0:
        iters, source = cfg.num_iterations, "num_iterations"
    elif cfg.target_flops > 0:
        iters, source = round(cfg.target_flops / (token_flops * total_batch)), "target_flops"
    elif ratio > 0:
        iters, source = target_tokens // total_batch, "target_param_data_ratio"
    else:
        raise UserError("no training horizon: set num_iterations, target_flops or target_param_data_ratio > 0")
    if iters < 1:
        raise UserError(f"the horizon gives {iters} steps at total_batch_size={total_batch:,}; lower the batch "
                        f"or raise the horizon")

    per_step = cfg.device_batch_size * cfg.max_seq_len * world_size
    if total_batch % per_step:
        raise UserError(f"total_batch_size={total_batch:,} is not a multiple of device_batch_size x max_seq_len x "
                        f"world_size = {cfg.device_batch_size} x {cfg.max_seq_len} x {world_size} = {per_step:,}")
    return TrainPlan(
        model=model_cfg, params_total=counts["total"],
        params_non_embedding=counts["non_embedding"],
        params_scaling=n_scaling, flops_per_token=token_flops, total_batch_size=total_batch,
        num_iterations=iters, horizon_from=source, grad_accum_steps=total_batch // per_step,
        batch_lr_scale=(total_batch / B_REF) ** 0.5,
        weight_decay=cfg.weight_decay * math.sqrt(total_batch / B_REF) * (d_ref / max(target_tokens, 1)),
        warmup_steps=cfg.warmup_steps, warmdown_ratio=cfg.warmdown_ratio,
        final_lr_frac=cfg.final_lr_frac)
