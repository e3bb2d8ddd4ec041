"""Upstream base_train.py's schedules: the learning-rate multiplier, Muon's momentum and weight decay over a run,
and apply_schedule, which sets them on the optimizer's groups before a step."""

import math

import torch


def lr_multiplier(it: int, num_iterations: int, *, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05) -> float:
    """Linear warm-up over warmup_steps, flat, then linear warm-down to final_lr_frac over the last
    warmdown_ratio of the run."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it: int, num_iterations: int, *, warmdown_ratio: float = 0.65) -> float:
    """0.85 -> 0.97 linearly over the first 400 steps, 0.97, then 0.97 -> 0.90 over the LR warm-down."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(it: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine decay of the Muon weight decay from weight_decay to zero over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def apply_schedule(optimizer: torch.optim.Optimizer, lr_mult: float, momentum: float | None = None,
                   weight_decay: float | None = None) -> None:
    """What base_train does before each step: every group's lr = initial_lr * lr_mult; Muon groups also get
    the scheduled momentum and weight decay (AdamW groups keep their fixed weight decay)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        if group.get("kind") == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
