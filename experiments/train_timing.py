"""Timed training steps of the real model and optimizer on random tokens (the data path is benchmarked apart):
what `bench train` prints and the GPU check's compile, fp8 and MFU rows measure."""

import time
from dataclasses import dataclass

import torch

from nanochat.config import learning_rates
from nanochat.distributed import compute_dtype, peak_flops
from nanochat.fp8 import enable_fp8
from nanochat.gpt import GPT, model_config_for_depth
from nanochat.optim import build_optimizer
from nanochat.stages.log_window import synchronize
from nanochat.stages.training import compiled_for_training, device_name


@dataclass
class StepTiming:
    step_s: float  # the median timed step: robust to a stray slow one
    first_loss: float  # before any optimizer step: equal weights and batch give equal losses across settings
    tokens_per_step: int
    peak_memory: int | None  # bytes, CUDA only

    @property
    def tok_per_sec(self) -> float:
        return self.tokens_per_step / self.step_s


def build_for_training(depth: int, vocab: int, seq_len: int, device: torch.device, window_pattern: str = "SSSL",
                       fp8: bool = False, seed: int = 0, head_dim: int = 128):
    """(model, optimizer) as base_train builds them, in the device's compute dtype; the same seed gives the same
    weights, so settings can be compared on equal terms."""
    torch.manual_seed(seed)
    config = model_config_for_depth(depth, vocab, seq_len, head_dim=head_dim, window_pattern=window_pattern)
    model = GPT.build(config, device=device, compute_dtype=compute_dtype(device.type)[0])
    if fp8:
        enable_fp8(model, device, "tensorwise")
    optimizer = build_optimizer(model.param_groups(), d_model=config.n_embd, **learning_rates(), weight_decay=0.1)
    return model, optimizer


def random_batch(vocab: int, B: int, T: int, device: torch.device, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randint(0, vocab, (B, T), device=device, generator=generator) for _ in range(2))


def timed_step(step_model, model, optimizer, batch) -> tuple[float, torch.Tensor]:
    """One full step (forward, backward, optimizer): its wall time, the device drained before and after, and the
    loss."""
    device = batch[0].device
    synchronize(device)
    start = time.perf_counter()
    loss = step_model(*batch)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start, loss


def with_backend(model, backend: str | None):
    """torch.compile(model) with `backend` ("aot_eager" traces forward and backward without generating kernels;
    "inductor" on a model time_training_steps already compiled, whose code is cached), or the model when None."""
    return torch.compile(model, dynamic=False, backend=backend) if backend else model


def time_training_steps(model, optimizer, batch, steps: int, warmup: int, compile_backend: str | None = None
                        ) -> StepTiming:
    """`warmup` untimed steps (compilation, allocator, autotuning), then `steps` timed ones."""
    device = batch[0].device
    if compile_backend == "inductor":  # as base_train compiles: the optimizer's updates too
        step_model = compiled_for_training(model, optimizer, device)
    else:
        step_model = with_backend(model, compile_backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, first_loss = [], None
    for step in range(warmup + steps):
        elapsed, loss = timed_step(step_model, model, optimizer, batch)
        first_loss = loss.item() if first_loss is None else first_loss
        if step >= warmup:
            times.append(elapsed)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return StepTiming(sorted(times)[len(times) // 2], first_loss, batch[0].numel(), peak)


def mfu(model, timing: StepTiming, device: torch.device) -> float | None:
    """Model FLOPs utilisation (a fraction), None where the device's peak FLOP/s is unknown (CPU, unlisted GPUs)."""
    peak = peak_flops(device_name(device))
    return None if peak is None else model.estimate_flops() * timing.tok_per_sec / peak
