"""The depth dial: from `depth` (and the horizon keys) to every size and hyperparameter of a base-training run.

As upstream computes it: width = depth * 64 rounded up to a multiple of head_dim (128), one head per 128 dims;
horizon from num_iterations > target_flops > target_param_data_ratio (tokens = ratio * scaling params); total
batch from the horizon, B = 2^19 * (D / D_ref)^0.383 (Power Lines) rounded to a power of 2, with d12 as the
reference; LRs scaled by sqrt(B / B_ref); weight decay by sqrt(B / B_ref) * D_ref / D (constant T_epoch).
Every derived value can be overridden by its config key, and `TrainPlan.describe()` is logged at start.
"""

import math
from dataclasses import asdict, dataclass

import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig, model_config_for_depth

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
    weight_decay: float  # scaled; the schedule decays it to 0 with a cosine
    warmup_steps: int
    warmdown_steps: int
    final_lr_frac: float

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations

    def describe(self) -> str:
        rows = {**{k: v for k, v in asdict(self).items() if k != "model"}, **asdict(self.model),
                "total_tokens": self.total_tokens, "tokens_per_scaling_param": self.total_tokens / self.params_scaling,
                "total_flops": self.flops_per_token * self.total_tokens}
        return "\n".join(f"  {k:<26}{v:,}" if isinstance(v, int) else f"  {k:<26}{v}" for k, v in rows.items())

    # -- schedules (step -> value) ---------------------------------------------------------------------------
    def lr_multiplier(self, step: int) -> float:
        """Linear warmup, flat, then linear warmdown over the last warmdown_ratio of the run to final_lr_frac."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step <= self.num_iterations - self.warmdown_steps:
            return 1.0
        progress = (self.num_iterations - step) / self.warmdown_steps
        return progress + (1 - progress) * self.final_lr_frac

    def muon_momentum(self, step: int) -> float:
        """0.85 -> 0.97 over the first 400 steps, back to 0.90 during the warmdown."""
        warmdown_start = self.num_iterations - self.warmdown_steps
        if step < 400:
            return 0.85 + (0.97 - 0.85) * step / 400
        if step >= warmdown_start and self.warmdown_steps > 0:
            return 0.97 + (0.90 - 0.97) * (step - warmdown_start) / self.warmdown_steps
        return 0.97

    def weight_decay_at(self, step: int) -> float:
        return self.weight_decay * 0.5 * (1 + math.cos(math.pi * step / self.num_iterations))


def meta_model(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def scaling_params(model: GPT) -> int:
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def plan(cfg, vocab_size: int, world_size: int) -> TrainPlan:
    """`cfg` carries the top-level base-training keys of nanochat.config.Config."""
    model_cfg = model_config_for_depth(cfg.depth, vocab_size, cfg.max_seq_len, head_dim=cfg.head_dim,
                                       aspect_ratio=cfg.aspect_ratio, window_pattern=cfg.window_pattern)
    model = meta_model(model_cfg)
    counts = model.num_scaling_params()
    n_scaling = scaling_params(model)
    flops_per_token = model.estimate_flops()
    ratio = cfg.target_param_data_ratio
    ref_ratio = ratio if ratio > 0 else 12.0  # the reference horizon is defined at a ratio even when unused
    ref_cfg = model_config_for_depth(REF_DEPTH, vocab_size, cfg.max_seq_len, head_dim=cfg.head_dim,
                                     aspect_ratio=cfg.aspect_ratio, window_pattern=cfg.window_pattern)
    d_ref = ref_ratio * scaling_params(meta_model(ref_cfg))
    target_tokens = ref_ratio * n_scaling

    total_batch = cfg.total_batch_size
    if total_batch <= 0:
        total_batch = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))
    if cfg.num_iterations > 0:
        iters, source = cfg.num_iterations, "num_iterations"
    elif cfg.target_flops > 0:
        iters, source = round(cfg.target_flops / (flops_per_token * total_batch)), "target_flops"
    elif ratio > 0:
        iters, source = int(target_tokens // total_batch), "target_param_data_ratio"
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
        params_non_embedding=counts["total"] - counts["wte"] - counts.get("value_embeds", 0),
        params_scaling=n_scaling, flops_per_token=flops_per_token, total_batch_size=total_batch,
        num_iterations=iters, horizon_from=source, grad_accum_steps=total_batch // per_step,
        batch_lr_scale=(total_batch / B_REF) ** 0.5,
        weight_decay=cfg.weight_decay * math.sqrt(total_batch / B_REF) * d_ref / max(target_tokens, 1),
        warmup_steps=cfg.warmup_steps, warmdown_steps=round(cfg.warmdown_ratio * iters),
        final_lr_frac=cfg.final_lr_frac)
