"""Bits per byte: the validation loss that does not depend on the tokenizer's vocabulary size."""

import math

import torch
import torch.distributed as dist

from nanochat.progress import Progress


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor, should_stop=None,
                 progress_label: str | None = None) -> float | None:
    """Sum of per-token losses (nats) over the sum of the UTF-8 bytes of the targets, across ranks. Special
    tokens (byte length 0) and ignored targets (-1) count in neither sum. `should_stop()` (a collective) is
    asked before each batch; when it says so, the evaluation stops there and returns None. `progress_label`: the
    label of a progress bar over the batches (None: none)."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    with Progress(steps, progress_label or "", unit="batch", enabled=progress_label is not None) as bar:
        for _ in range(steps):
            if should_stop is not None and should_stop():
                return None
            x, y = next(batches)[:2]
            losses = model(x, y, loss_reduction="none").view(-1).double()
            y = y.reshape(-1)
            nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
            total_nats += (losses * (nbytes > 0)).sum()
            total_bytes += nbytes.sum()
            bar.advance()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
