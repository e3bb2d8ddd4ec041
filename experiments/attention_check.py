"""The GPU check's attention rows: each backend's output and gradients, training-shaped and through the KV
cache, against a plain fp32 reference, and its forward+backward time."""

import math
import statistics
import time

import torch

from nanochat import attention as attn


class Skipped(Exception):
    """A check that cannot run here; its message says why (the row reads "skipped: <message>")."""


def reference_attention(q, k, v, left: int) -> torch.Tensor:
    """Causal attention written out in fp32: every query against every key, masked (keys more than `left`
    positions back are hidden; left < 0: none), GQA by repeating the kv heads. (B, T, H, D) in and out."""
    T, D = q.size(1), q.size(3)
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    distance = torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)[None, :]
    visible = (distance >= 0) & ((distance <= left) if left >= 0 else True)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in fp32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _cached(q, k, v, window) -> torch.Tensor:
    """The engine's path: all but the last position written into an empty cache at once (prefill), then the
    last one decoded against it; the last query's output."""
    B, T, Hkv, D = k.shape
    k_cache, v_cache = (torch.zeros(B, T, Hkv, D, device=k.device, dtype=k.dtype) for _ in range(2))
    seqlens = torch.zeros(B, dtype=torch.int32, device=k.device)
    head, last = (tuple(t[:, part].contiguous() for t in (q, k, v)) for part in (slice(None, -1), slice(-1, None)))
    attn.attention(*head, window=window, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens)
    seqlens.fill_(T - 1)
    return attn.attention(*last, window=window, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens)


def backend_errors(backend: str, windows, shape, dtype, device, with_cache: bool) -> dict[str, float]:
    """The worst relative error over `windows` of the forward output, the q/k/v gradients and (`with_cache`) the
    cached decode, with `backend` forced ("sdpa" includes FlexAttention for training-shaped sliding windows
    on CUDA)."""
    B, T, H, Hkv, D = shape
    generator = torch.Generator(device=device).manual_seed(0)
    worst = {"output": 0.0, "grad": 0.0, **({"decode": 0.0} if with_cache else {})}
    for window in windows:
        q, k, v = (torch.randn(B, T, heads, D, device=device, generator=generator).to(dtype).requires_grad_()
                   for heads in (H, Hkv, Hkv))
        left = attn.window_left(window)
        want = reference_attention(q, k, v, left)
        want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
        attn.set_backend(backend)
        try:
            got = attn.attention(q, k, v, causal=True, window=window)
            got_grads = torch.autograd.grad(got, (q, k, v), torch.ones_like(got))
            with torch.no_grad():
                decoded = _cached(q, k, v, window) if with_cache else None
        finally:
            attn.set_backend("auto")
        worst["output"] = max(worst["output"], relative_error(got, want))
        worst["grad"] = max(worst["grad"], *(relative_error(g, w) for g, w in zip(got_grads, want_grads)))
        if decoded is not None:
            worst["decode"] = max(worst["decode"], relative_error(decoded, want[:, -1:]))
    return worst


def forward_backward_ms(backend: str, window, shape, dtype, device, repeats: int = 10) -> float:
    """Median forward+backward time of `backend` at `shape`, after a warm-up call (kernels, compilation)."""
    B, T, H, Hkv, D = shape
    q, k, v = (torch.randn(B, T, heads, D, device=device, dtype=dtype, requires_grad=True) for heads in (H, Hkv, Hkv))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    attn.set_backend(backend)
    try:
        times = []
        for _ in range(repeats + 1):
            sync()
            start = time.perf_counter()
            attn.attention(q, k, v, causal=True, window=window).sum().backward()
            sync()
            times.append(time.perf_counter() - start)
    finally:
        attn.set_backend("auto")
    return 1000 * statistics.median(times[1:])


def why_unavailable(backend: str, cuda: bool) -> str | None:
    """Why a backend cannot run here (the row's skip reason), or None when it can."""
    if not cuda:
        return "no CUDA" if backend != "sdpa" else None
    major, minor = torch.cuda.get_device_capability()
    if backend == "fa3" and not attn.HAS_FA3:
        return (f"FA3 needs SM90 (Hopper), this is SM{major}{minor}" if major != 9 else
                "not installed (neither flash_attn_interface nor the kernels hub's varunneal/flash-attention-3)")
    if backend == "fa2" and not attn.HAS_FA2:
        return f"FA2 needs SM8x/SM90, this is SM{major}{minor}" if major not in (8, 9) else "flash_attn not installed"
    if backend == "flex" and not attn.HAS_FLEX:
        return f"torch {torch.__version__} has no FlexAttention"
    return None


def _plan(row: str, window, cuda: bool) -> tuple[str, list, bool]:
    """(the backend setting to force, the windows to compare, whether to compare the KV-cache path) of a row."""
    if row == "flex":  # what the "sdpa" setting runs for training-shaped sliding windows on CUDA
        return "sdpa", [window], False
    if row == "sdpa" and cuda:  # a window would go to Flex (its own row)
        return "sdpa", [None], True
    return row, [None, window], True  # the CPU's sdpa takes windows with a dense mask


def check_backend(row: str, check_shape, speed_shape, window_left: int, dtype, device,
                  tolerance: float) -> tuple[bool, str]:
    """(passed, figure) of one attention row ("fa3", "fa2", "flex", "sdpa"): errors at `check_shape`, speed at
    `speed_shape`; raises Skipped where the backend cannot run here."""
    reason = why_unavailable(row, device.type == "cuda")
    if reason:
        raise Skipped(reason)
    backend, windows, with_cache = _plan(row, (window_left, 0), device.type == "cuda")
    errors = backend_errors(backend, windows, check_shape, dtype, device, with_cache)
    speed = forward_backward_ms(backend, windows[-1], speed_shape, dtype, device)
    compared = " and ".join("causal" if w is None else f"window {w[0]}" for w in windows)
    figure = ", ".join(f"{name} {error:.1e}" for name, error in errors.items())
    return (max(errors.values()) <= tolerance,
            f"{compared}: rel. error {figure} (tol {tolerance:.0e}); fwd+bwd {speed:.2f} ms at {speed_shape}")
