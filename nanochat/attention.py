"""The model's single attention entry point, and the KV cache used for generation.

Shapes follow the flash-attention convention used by upstream nanochat: q is (B, Tq, H, D), k and v are
(B, Tk, Hkv, D) with H a multiple of Hkv (grouped-query attention), and the output is (B, Tq, H, D).
The softmax scale is always 1/sqrt(D).

Windows use flash-attention's (left, right) convention: with causal attention, query at absolute position
i sees keys at positions j with i - left <= j <= i, i.e. left+1 keys including itself; left = -1 (or None)
means unlimited. `window` may be None, an int `left`, or a `(left, right)` tuple (right must be 0 when causal).

Backends, picked per call from static facts only (device, dtype, head size), so that torch.compile sees no
data-dependent Python control flow:

1. "fa3": Flash Attention 3 on Hopper (SM90), from the `flash_attn_interface` package or the HF `kernels`
   hub build (`varunneal/flash-attention-3`), fp16/bf16 only.
2. "fa2": the `flash_attn` package (FA2) on SM8x/SM90 when importable, fp16/bf16 only.
3. "sdpa": PyTorch scaled_dot_product_attention. Sliding windows: on CUDA training-shaped calls go through a
   compiled FlexAttention with a block-sparse mask built at block granularity (no T x T tensor); on CPU, and
   for KV-cache prefill chunks, an explicit boolean (Tq, Tk) mask; single-token decode slices the cache.

NANOCHAT_ATTENTION_BACKEND=fa3|fa2|sdpa (or `set_backend`) forces a backend; "auto" (default) picks as above.
All optional GPU packages are imported under guards: on a CPU-only machine this module needs plain torch.

KV cache (see `KVCache`): in cache mode `attention(q, k, v, k_cache=..., v_cache=..., cache_seqlens=...)`
writes the new k/v (B, Tnew, Hkv, D) into the caches in place at offset cache_seqlens and attends q over
cache[:, :cache_seqlens + Tnew], with the queries aligned to the end (query t sits at absolute position
cache_seqlens + t). It does NOT advance the cache; the model does that once per forward, after its last layer.
The SDPA fallback assumes every row of the batch sits at the same position (cache_seqlens[0]); the flash
kernels honour per-row positions.
"""

import functools
import os

import torch
import torch.nn.functional as F

BACKENDS = ("fa3", "fa2", "sdpa")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLEX_BLOCK = 128

# -----------------------------------------------------------------------------------------------------------
# Optional kernels, probed once at import (never during a compiled trace).


def _load_fa3():
    """Return an FA3 interface module (has flash_attn_func / flash_attn_with_kvcache) or None."""
    if not torch.cuda.is_available():
        return None
    try:
        if torch.cuda.get_device_capability()[0] != 9:
            return None  # the FA3 builds we can load are Hopper-only
    except Exception:
        return None
    try:
        import flash_attn_interface  # FA3 built from flash-attention's hopper/ directory
        return flash_attn_interface
    except Exception:
        pass
    if os.environ.get("NANOCHAT_NO_KERNELS_HUB"):
        return None
    try:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from kernels import get_kernel
        try:
            kernel = get_kernel("varunneal/flash-attention-3", version=1)
        except TypeError:  # older `kernels` without the version argument
            kernel = get_kernel("varunneal/flash-attention-3")
        return getattr(kernel, "flash_attn_interface", kernel)
    except Exception:
        return None


def _load_fa2():
    """Return the FA2 `flash_attn` module or None (only on SM8x/SM90, where its kernels exist)."""
    if not torch.cuda.is_available():
        return None
    try:
        if torch.cuda.get_device_capability()[0] not in (8, 9):
            return None
        import flash_attn
        if not (hasattr(flash_attn, "flash_attn_func") and hasattr(flash_attn, "flash_attn_with_kvcache")):
            return None
        return flash_attn
    except Exception:
        return None


def _load_flex():
    """A compiled flex_attention (+ BlockMask) for sliding windows on CUDA, or None."""
    if not torch.cuda.is_available():
        return None, None
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        return torch.compile(flex_attention, dynamic=False), BlockMask
    except Exception:
        return None, None


_fa3 = _load_fa3()
_fa2 = _load_fa2()
_flex_attention, _BlockMask = _load_flex()
HAS_FA3 = _fa3 is not None
HAS_FA2 = _fa2 is not None
HAS_FLEX = _flex_attention is not None

_override = os.environ.get("NANOCHAT_ATTENTION_BACKEND", "auto").strip().lower() or "auto"


def set_backend(name: str = "auto") -> None:
    """Force a backend ("fa3", "fa2", "sdpa") or go back to automatic choice ("auto")."""
    global _override
    name = (name or "auto").lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS + ('auto',)}")
    _override = name


def available_backends() -> list[str]:
    return [name for name, ok in (("fa3", HAS_FA3), ("fa2", HAS_FA2), ("sdpa", True)) if ok]


def select_backend(q: torch.Tensor) -> str:
    """The backend `attention` will use for a query tensor like `q`."""
    flash_ok = q.is_cuda and q.dtype in _FLASH_DTYPES and q.size(-1) <= 256
    if _override == "fa3":
        if not (HAS_FA3 and flash_ok):
            raise RuntimeError("attention backend fa3 was forced but is not usable here (needs Hopper, FA3, fp16/bf16)")
        return "fa3"
    if _override == "fa2":
        if not (HAS_FA2 and flash_ok):
            raise RuntimeError("attention backend fa2 was forced but is not usable here (needs flash_attn, fp16/bf16)")
        return "fa2"
    if _override == "sdpa" or not flash_ok:
        return "sdpa"
    if HAS_FA3:
        return "fa3"
    if HAS_FA2:
        return "fa2"
    return "sdpa"


# -----------------------------------------------------------------------------------------------------------
# Helpers


def window_left(window, causal: bool = True) -> int:
    """Normalize a window spec (None | int | (left, right)) to the left extent; -1 means unlimited."""
    if window is None:
        return -1
    if isinstance(window, (tuple, list)):
        left, right = int(window[0]), int(window[1])
        if causal and right not in (0, -1):
            raise ValueError(f"causal attention needs a window with right extent 0, got {tuple(window)}")
        if not causal and (left >= 0 or right >= 0):
            raise ValueError("sliding windows are only supported for causal attention")
    else:
        left = int(window)
        if not causal and left >= 0:
            raise ValueError("sliding windows are only supported for causal attention")
    return -1 if left < 0 else left


def _dense_mask(Tq: int, Tk: int, left: int, device: str) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True = attend; queries aligned to the end of the keys. Cached in eager mode;
    under torch.compile it is built in the graph (from constants, so the compiler can fold it)."""
    if torch.compiler.is_compiling():
        return _build_dense_mask(Tq, Tk, left, device)
    return _cached_dense_mask(Tq, Tk, left, device)


def _build_dense_mask(Tq: int, Tk: int, left: int, device: str) -> torch.Tensor:
    dev = torch.device(device)
    rows = (Tk - Tq) + torch.arange(Tq, device=dev).unsqueeze(1)
    cols = torch.arange(Tk, device=dev).unsqueeze(0)
    mask = cols <= rows
    if left >= 0:
        mask = mask & (rows - cols <= left)
    return mask


_cached_dense_mask = functools.lru_cache(maxsize=64)(_build_dense_mask)


def sliding_window_block_tensors(Tq: int, Tk: int, left: int, device, block_size: int = _FLEX_BLOCK):
    """Block-level description of the causal sliding-window mask, computed without any Tq x Tk tensor.

    Returns (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) shaped (1, 1, nq) and
    (1, 1, nq, nk), as BlockMask.from_kv_blocks wants: "partial" blocks need the element mask, "full"
    blocks are entirely visible. Queries are aligned to the end of the keys.
    """
    offset = Tk - Tq
    nq = -(-Tq // block_size)
    nk = -(-Tk // block_size)
    qb = torch.arange(nq, device=device)
    kb = torch.arange(nk, device=device)
    q_first = qb * block_size + offset  # absolute position of each query block's first / last row
    q_last = torch.clamp(qb * block_size + block_size, max=Tq) - 1 + offset
    k_first = kb * block_size
    k_last = torch.clamp(kb * block_size + block_size, max=Tk) - 1
    span = left if left >= 0 else Tk  # unlimited window: nothing is ever too far back
    any_visible = (k_first[None, :] <= q_last[:, None]) & (k_last[None, :] >= q_first[:, None] - span)
    all_visible = (k_last[None, :] <= q_first[:, None]) & (q_last[:, None] - k_first[None, :] <= span)
    partial = any_visible & ~all_visible

    def pack(sel):
        num = sel.sum(dim=-1).to(torch.int32)
        # stable sort puts the selected block indices first, in increasing order
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[None, None], order[None, None]

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(all_visible)
    return kv_num, kv_idx, full_num, full_idx


def _sliding_mask_mod(offset: int, left: int):
    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return (kv_idx <= pos) & (pos - kv_idx <= left)
    return mask_mod


def _flex_block_mask(Tq: int, Tk: int, left: int, device: str):
    if torch.compiler.is_compiling():
        return _build_flex_block_mask(Tq, Tk, left, device)
    return _cached_flex_block_mask(Tq, Tk, left, device)


def _build_flex_block_mask(Tq: int, Tk: int, left: int, device: str):
    kv_num, kv_idx, full_num, full_idx = sliding_window_block_tensors(Tq, Tk, left, torch.device(device))
    return _BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=_FLEX_BLOCK,
        mask_mod=_sliding_mask_mod(Tk - Tq, left), seq_lengths=(Tq, Tk),
    )


_cached_flex_block_mask = functools.lru_cache(maxsize=64)(_build_flex_block_mask)


def _sdpa(q, k, v, left: int, causal: bool, allow_flex: bool):
    """SDPA-family attention on (B, T, H, D) tensors; returns (B, Tq, H, D)."""
    Tq, Tk = q.size(1), k.size(1)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = qt.size(1) != kt.size(1)
    if not causal:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=False, enable_gqa=gqa)
    elif Tq == 1:
        # single-token decode: the query is the newest position, so a window just trims old keys
        if 0 <= left < Tk - 1:
            kt, vt = kt[:, :, Tk - (left + 1):], vt[:, :, Tk - (left + 1):]
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=False, enable_gqa=gqa)
    elif Tq == Tk and (left < 0 or left >= Tk - 1):
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    elif allow_flex and q.is_cuda and HAS_FLEX and Tq == Tk:
        block_mask = _flex_block_mask(Tq, Tk, left, str(q.device))
        y = _flex_attention(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa)
    else:
        mask = _dense_mask(Tq, Tk, left, str(q.device))
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# -----------------------------------------------------------------------------------------------------------
# Public entry point


def attention(q, k, v, *, causal: bool = True, window=None, k_cache=None, v_cache=None, cache_seqlens=None):
    """Scaled dot-product attention, (B, T, H, D) layout, GQA, causal sliding windows and KV-cache decoding.

    Without a cache: q (B, T, H, D), k/v (B, T, Hkv, D); returns (B, T, H, D).
    With a cache (k_cache/v_cache (B, Tmax, Hkv, D) and cache_seqlens, an int32 (B,) tensor or an int):
    k/v (B, Tnew, Hkv, D) are written into the caches at cache_seqlens (in place; pass k=v=None to only
    read), and q (B, Tnew, H, D) attends over everything cached so far plus the new entries.
    """
    left = window_left(window, causal)
    backend = select_backend(q)
    fa_window = (left, 0) if causal else (-1, -1)

    if k_cache is None:
        if backend == "fa3":
            return _first(_fa3.flash_attn_func(q, k, v, causal=causal, window_size=fa_window))
        if backend == "fa2":
            return _fa2.flash_attn_func(q, k, v, causal=causal, window_size=fa_window)
        return _sdpa(q, k, v, left, causal, allow_flex=True)

    assert v_cache is not None and cache_seqlens is not None, "cache mode needs k_cache, v_cache and cache_seqlens"
    if backend in ("fa3", "fa2") and k_cache.dtype == q.dtype:
        seqlens = cache_seqlens
        if not torch.is_tensor(seqlens):
            seqlens = torch.full((q.size(0),), int(seqlens), dtype=torch.int32, device=q.device)
        lib = _fa3 if backend == "fa3" else _fa2
        out = lib.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                          causal=causal, window_size=fa_window)
        return _first(out)

    pos = int(cache_seqlens[0]) if torch.is_tensor(cache_seqlens) else int(cache_seqlens)
    end = pos
    if k is not None:
        t_new = k.size(1)
        assert pos + t_new <= k_cache.size(1), f"KV cache overflow: {pos} + {t_new} > {k_cache.size(1)}"
        k_cache[:, pos:pos + t_new] = k
        v_cache[:, pos:pos + t_new] = v
        end = pos + t_new
    k_all, v_all = k_cache[:, :end].to(q.dtype), v_cache[:, :end].to(q.dtype)  # no-op when dtypes agree
    return _sdpa(q, k_all, v_all, left, causal, allow_flex=False)


# -----------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Per-layer key/value buffers for incremental decoding (same layout and method names as upstream's).

    k_cache / v_cache: (n_layers, B, max_seq_len, n_heads, head_dim), where n_heads is the model's
    n_kv_head. cache_seqlens: int32 (B,), how many positions are filled (the same for every row in
    practice). prev_embedding: the last token's normalized embedding, which the model's "smear" needs to
    decode the next token; None while the cache is empty.

    Protocol: the model reads `get_pos()` for rotary offsets, hands each layer `get_layer_cache(i)` and
    `cache_seqlens` to `attention` (which writes the new keys/values), then calls `advance(T)` once after
    its last layer. To sample N continuations of one prompt: prefill a batch-1 cache with the prompt,
    then `cache.expand(N)` (a new batch-N cache holding N copies), or `big.prefill(small)`.
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device=None, dtype=torch.float32):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None

    @classmethod
    def for_model(cls, model, batch_size: int, seq_len: int | None = None, device=None, dtype=None) -> "KVCache":
        """A cache shaped for `model` (a nanochat.gpt.GPT), in the model's compute dtype and device."""
        cfg = model.config
        return cls(
            batch_size=batch_size,
            num_heads=cfg.n_kv_head,
            seq_len=seq_len or cfg.sequence_len,
            head_dim=cfg.n_embd // cfg.n_head,
            num_layers=cfg.n_layer,
            device=device if device is not None else model.get_device(),
            dtype=dtype if dtype is not None else model.compute_dtype,
        )

    @property
    def device(self):
        return self.k_cache.device

    @property
    def dtype(self):
        return self.k_cache.dtype

    def reset(self) -> None:
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def get_pos(self) -> int:
        """Filled length (of row 0; rows move together)."""
        return int(self.cache_seqlens[0].item())

    def get_layer_cache(self, layer_idx: int):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens: int) -> None:
        self.cache_seqlens += num_tokens

    def prefill(self, other: "KVCache") -> None:
        """Copy `other`'s filled prefix into this (empty) cache; a batch-1 `other` is broadcast to all rows."""
        assert self.get_pos() == 0, "can only prefill an empty KV cache"
        assert (self.n_layers, self.n_heads, self.head_dim) == (other.n_layers, other.n_heads, other.head_dim)
        assert other.batch_size in (1, self.batch_size), "prefill needs a batch-1 or same-batch source"
        pos = other.get_pos()
        assert pos <= self.max_seq_len, f"source holds {pos} positions, this cache only {self.max_seq_len}"
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()

    def expand(self, batch_size: int, seq_len: int | None = None) -> "KVCache":
        """A new cache with `batch_size` rows, each a copy of this (batch-1 or same-batch) cache's state."""
        new = KVCache(batch_size, self.n_heads, seq_len or self.max_seq_len, self.head_dim, self.n_layers,
                      device=self.device, dtype=self.dtype)
        new.prefill(self)
        return new

    def clone(self) -> "KVCache":
        return self.expand(self.batch_size)


__all__ = ["attention", "KVCache", "select_backend", "set_backend", "available_backends", "window_left",
           "sliding_window_block_tensors", "HAS_FA3", "HAS_FA2", "HAS_FLEX", "BACKENDS"]
