"""nanochat.attention against a naive fp32 reference (explicit scores, mask and softmax), on the CPU."""

import math

import pytest
import torch

from nanochat import attention as attn_mod
from nanochat.attention import KVCache, attention, select_backend, sliding_window_block_tensors, window_left


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(q, k, v, left=-1, causal=True):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D); queries sit at the last Tq positions of the keys."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    pos = (Tk - Tq) + torch.arange(Tq)[:, None]
    key = torch.arange(Tk)[None, :]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        allowed = key <= pos
        if left >= 0:
            allowed = allowed & (pos - key <= left)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def qkv(B=2, Tq=23, Tk=None, H=4, Hkv=4, D=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    Tk = Tk or Tq
    q = torch.randn(B, Tq, H, D, generator=g)
    k = torch.randn(B, Tk, Hkv, D, generator=g)
    v = torch.randn(B, Tk, Hkv, D, generator=g)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err < tol, f"max abs error {err}"


def test_cpu_uses_sdpa_and_window_specs():
    q, _, _ = qkv()
    assert select_backend(q) == "sdpa"
    assert window_left(None) == -1
    assert window_left((-1, 0)) == -1
    assert window_left((5, 0)) == 5
    assert window_left(7) == 7
    with pytest.raises(ValueError):
        window_left((5, 3))  # causal windows look back only
    with pytest.raises(ValueError):
        window_left((5, 0), causal=False)


def test_causal_matches_reference():
    q, k, v = qkv()
    close(attention(q, k, v, causal=True), reference(q, k, v))
    close(attention(q, k, v, causal=True, window=(-1, 0)), reference(q, k, v))


def test_non_causal_matches_reference():
    q, k, v = qkv(Tq=9)
    close(attention(q, k, v, causal=False), reference(q, k, v, causal=False))


@pytest.mark.parametrize("left", [0, 1, 5, 16, 21, 22, 100])
def test_sliding_window_matches_reference(left):
    q, k, v = qkv(Tq=23)
    close(attention(q, k, v, window=(left, 0)), reference(q, k, v, left=left))
    close(attention(q, k, v, window=left), reference(q, k, v, left=left))


def test_window_actually_restricts():
    q, k, v = qkv(Tq=23)
    full = attention(q, k, v)
    windowed = attention(q, k, v, window=(3, 0))
    # the first 4 positions see the same keys either way, later ones do not
    close(full[:, :4], windowed[:, :4])
    assert (full[:, 10:] - windowed[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("Hkv", [1, 2, 3])
@pytest.mark.parametrize("left", [-1, 4])
def test_gqa_matches_reference(Hkv, left):
    q, k, v = qkv(H=6, Hkv=Hkv, Tq=19)
    close(attention(q, k, v, window=(left, 0)), reference(q, k, v, left=left))


@pytest.mark.parametrize("left", [-1, 6])
def test_gradients_match_reference(left):
    q, k, v = qkv(H=4, Hkv=2, Tq=17, requires_grad=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    w = torch.randn(2, 17, 4, 16, generator=torch.Generator().manual_seed(5))
    (attention(q, k, v, window=(left, 0)) * w).sum().backward()
    (reference(q2, k2, v2, left=left) * w).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        close(a.grad, b.grad, tol=1e-4)


def test_chunk_against_longer_keys_is_end_aligned():
    q, k, v = qkv(Tq=5, Tk=20, H=4, Hkv=2)
    k_cache = torch.zeros(2, 32, 2, 16)
    v_cache = torch.zeros(2, 32, 2, 16)
    k_cache[:, :15], v_cache[:, :15] = k[:, :15], v[:, :15]
    seqlens = torch.full((2,), 15, dtype=torch.int32)
    for left in (-1, 3):
        out = attention(q, k[:, 15:], v[:, 15:], window=(left, 0), k_cache=k_cache.clone(), v_cache=v_cache.clone(),
                        cache_seqlens=seqlens)
        close(out, reference(q, k, v, left=left))


@pytest.mark.parametrize("left", [-1, 0, 4])
def test_kv_cache_prefill_then_decode_matches_full(left):
    B, T, H, Hkv, D = 2, 16, 4, 2, 8
    q, k, v = qkv(B=B, Tq=T, H=H, Hkv=Hkv, D=D, seed=3)
    full = attention(q, k, v, window=(left, 0))
    close(full, reference(q, k, v, left=left))

    cache = KVCache(batch_size=B, num_heads=Hkv, seq_len=32, head_dim=D, num_layers=1)
    k_cache, v_cache = cache.get_layer_cache(0)
    outs = []
    # prefill 6 positions, then a chunk of 3 after them, then one token at a time
    for start, stop in [(0, 6), (6, 9)] + [(t, t + 1) for t in range(9, T)]:
        outs.append(attention(q[:, start:stop], k[:, start:stop], v[:, start:stop], window=(left, 0),
                              k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache.cache_seqlens))
        cache.advance(stop - start)
    assert cache.get_pos() == T
    close(torch.cat(outs, dim=1), full)
    close(cache.k_cache[0, :, :T], k)  # the cache holds what was written, in place
    close(cache.v_cache[0, :, :T], v)


def test_kv_cache_expand_clone_prefill_reset():
    cache = KVCache(batch_size=1, num_heads=2, seq_len=10, head_dim=4, num_layers=3)
    cache.k_cache.normal_()
    cache.v_cache.normal_()
    cache.advance(6)
    cache.prev_embedding = torch.randn(1, 1, 8)

    many = cache.expand(3)
    assert many.batch_size == 3 and many.get_pos() == 6 and many.max_seq_len == 10
    assert torch.equal(many.cache_seqlens, torch.full((3,), 6, dtype=torch.int32))
    for row in range(3):
        assert torch.equal(many.k_cache[:, row, :6], cache.k_cache[:, 0, :6])
        assert torch.equal(many.v_cache[:, row, :6], cache.v_cache[:, 0, :6])
        assert torch.equal(many.prev_embedding[row], cache.prev_embedding[0])
    assert not many.k_cache[:, :, 6:].any()  # nothing past the filled prefix is copied
    longer = cache.expand(2, seq_len=20)
    assert longer.max_seq_len == 20 and longer.get_pos() == 6

    twin = many.clone()
    twin.k_cache.add_(1.0)
    twin.advance(1)
    assert many.get_pos() == 6 and not torch.equal(twin.k_cache, many.k_cache)  # independent storage

    with pytest.raises(AssertionError):
        many.prefill(cache)  # only an empty cache can be prefilled
    many.reset()
    assert many.get_pos() == 0 and many.prev_embedding is None


@pytest.mark.parametrize("T,left", [(256, 0), (256, 100), (384, 127), (384, 128), (512, 200), (200, 60), (640, 1000)])
def test_flex_block_mask_tensors_match_dense_definition(T, left):
    """The GPU sliding-window path builds its block-sparse mask at block granularity; check every block's
    classification (skipped / partial / full) against the element mask it summarizes."""
    bs = 128
    kv_num, kv_idx, full_num, full_idx = sliding_window_block_tensors(T, T, left, torch.device("cpu"), bs)
    idx = torch.arange(T)
    dense = idx[None, :] <= idx[:, None]
    if left >= 0:
        dense = dense & ((idx[:, None] - idx[None, :]) <= left)
    nq = nk = -(-T // bs)
    for qb in range(nq):
        partial = set(kv_idx[0, 0, qb, :kv_num[0, 0, qb]].tolist())
        full = set(full_idx[0, 0, qb, :full_num[0, 0, qb]].tolist())
        assert not partial & full
        for kb in range(nk):
            tile = dense[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
            if tile.all():
                assert kb in full, (qb, kb)
            elif tile.any():
                assert kb in partial, (qb, kb)
            else:
                assert kb not in partial and kb not in full, (qb, kb)


def test_flex_block_mask_builds_and_agrees_with_create_block_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    T, left = 384, 100
    tensors = sliding_window_block_tensors(T, T, left, torch.device("cpu"))
    ours = flex.BlockMask.from_kv_blocks(*tensors, BLOCK_SIZE=128, mask_mod=attn_mod._sliding_mask_mod(0, left),
                                         seq_lengths=(T, T))
    theirs = flex.create_block_mask(attn_mod._sliding_mask_mod(0, left), None, None, T, T, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())


def test_backend_override_rejects_unavailable(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setattr(attn_mod, "_override", "fa3")
    with pytest.raises(RuntimeError):
        attention(q, k, v)
    with pytest.raises(ValueError):
        attn_mod.set_backend("xformers")
