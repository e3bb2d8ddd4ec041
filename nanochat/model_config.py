"""The model's shape and what follows from it alone: the config, the depth dial's width, the sliding windows,
the parameter and FLOP counts in closed form, and what a token costs at inference (FLOPs, KV-cache bytes).

Torch-free (nanochat.gpt builds the modules): the login node plans a run (tokens to stage, checkpoint size) at
submission without importing torch, and a test keeps these counts equal to the built model's.
"""

from dataclasses import dataclass

VE_GATE_CHANNELS = 12  # value-embedding gate reads this many leading channels of the block input
SMEAR_CHANNELS = 24  # smear gate reads this many leading channels of the embedding


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA)
    n_embd: int = 768
    # Tiled over layers; L = full context, S = short (a quarter of the context, rounded up to 128).
    # The last layer is always L.
    window_pattern: str = "SSSL"


def model_config_for_depth(depth: int, vocab_size: int, sequence_len: int, head_dim: int = 128,
                           aspect_ratio: int = 64, window_pattern: str = "SSSL") -> GPTConfig:
    """Upstream's depth dial: width = depth * aspect_ratio rounded up to a multiple of head_dim."""
    base_dim = depth * aspect_ratio
    n_embd = ((base_dim + head_dim - 1) // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, window_pattern=window_pattern)


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    return ((vocab_size + multiple - 1) // multiple) * multiple


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes_for(config: GPTConfig) -> list[tuple[int, int]]:
    """Per-layer (left, right) windows in flash-attention convention, exactly as upstream computes them."""
    pattern = config.window_pattern.upper()
    if not pattern or any(c not in "SL" for c in pattern):
        raise ValueError(f"invalid window_pattern {config.window_pattern!r}: use only the letters S and L")
    long_window = config.sequence_len
    short_window = -(-long_window // 4 // 128) * 128  # a quarter of the context, rounded up to 128
    sizes = [((long_window if pattern[i % len(pattern)] == "L" else short_window), 0) for i in range(config.n_layer)]
    sizes[-1] = (long_window, 0)
    return sizes


def _ve_layers(c: GPTConfig) -> int:
    return sum(has_ve(i, c.n_layer) for i in range(c.n_layer))


def num_matmul_params(c: GPTConfig, pad_vocab_size_to: int = 64) -> int:
    """Weights that multiply the token stream: the blocks (value-embedding gates included), the smear gate and
    lm_head, as upstream counts every Linear (the smear gate adds 6 * 24 = 144 FLOPs a token)."""
    hd = c.n_embd // c.n_head
    per_layer = (c.n_embd * c.n_head * hd  # c_q
                 + 2 * c.n_embd * c.n_kv_head * hd  # c_k, c_v
                 + c.n_embd * c.n_embd  # c_proj
                 + 8 * c.n_embd * c.n_embd)  # c_fc, mlp.c_proj
    ve_gates = _ve_layers(c) * VE_GATE_CHANNELS * c.n_kv_head
    return (c.n_layer * per_layer + ve_gates + SMEAR_CHANNELS
            + padded_vocab_size(c.vocab_size, pad_vocab_size_to) * c.n_embd)


def flops_per_token(c: GPTConfig, pad_vocab_size_to: int = 64) -> int:
    """Training FLOPs per token (forward + backward), as upstream: 6 per matmul weight plus
    12 * n_head * head_dim * min(window, sequence_len) per layer for the attention scores and values."""
    hd = c.n_embd // c.n_head
    attn_flops = sum(12 * c.n_head * hd * (c.sequence_len if left < 0 else min(left, c.sequence_len))
                     for left, _ in window_sizes_for(c))
    return 6 * num_matmul_params(c, pad_vocab_size_to) + attn_flops


def param_counts(c: GPTConfig, pad_vocab_size_to: int = 64) -> dict[str, int]:
    """Upstream's parameter counts by group (wte, value_embeds, lm_head, transformer_matrices, scalars, total),
    plus `non_embedding` (total minus the token and value embedding tables) and `scaling` (transformer_matrices
    + lm_head: what upstream's base_train multiplies by target_param_data_ratio)."""
    vocab, hd = padded_vocab_size(c.vocab_size, pad_vocab_size_to), c.n_embd // c.n_head
    counts = {"wte": vocab * c.n_embd, "value_embeds": _ve_layers(c) * vocab * c.n_kv_head * hd,
              "lm_head": c.n_embd * vocab}
    # the blocks' weights: the smear gate sits outside them and is counted with the scalars, as upstream
    counts["transformer_matrices"] = num_matmul_params(c, pad_vocab_size_to) - counts["lm_head"] - SMEAR_CHANNELS
    counts["scalars"] = 2 * c.n_layer + SMEAR_CHANNELS + 2  # resid and x0 lambdas, smear gate, smear and backout
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["wte"] - counts["value_embeds"]
    counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
    return counts


# -- inference: what one token costs with the engine's KV cache (nanochat.engine, nanochat.attention) ----------

def attended_keys(c: GPTConfig, position: int) -> list[int]:
    """Per layer, how many keys the query at 0-based `position` attends (itself included): every earlier
    position, or left + 1 of them under a window of left extent `left`, which is what the attention kernels
    and the KV-cache decode read."""
    return [min(position + 1, left + 1) for left, _ in window_sizes_for(c)]


def decode_flops(c: GPTConfig, position: int, pad_vocab_size_to: int = 64) -> int:
    """Forward FLOPs of the token at `position` with a KV cache: 2 per matmul weight, and per layer
    4 * n_head * head_dim per attended key (the scores, then the weighted values)."""
    hd = c.n_embd // c.n_head
    return 2 * num_matmul_params(c, pad_vocab_size_to) + 4 * c.n_head * hd * sum(attended_keys(c, position))


def prefill_flops(c: GPTConfig, num_tokens: int, pad_vocab_size_to: int = 64) -> int:
    """Forward FLOPs of a prompt run in one pass: decode_flops summed over its positions, in closed form
    (per layer the attended keys ramp 1, 2, ..., w and stay at the window's w = left + 1)."""
    hd = c.n_embd // c.n_head
    keys = 0
    for left, _ in window_sizes_for(c):
        ramp = min(num_tokens, left + 1)
        keys += ramp * (ramp + 1) // 2 + (num_tokens - ramp) * (left + 1)
    return 2 * num_matmul_params(c, pad_vocab_size_to) * num_tokens + 4 * c.n_head * hd * keys


def kv_cache_bytes_per_token(c: GPTConfig, dtype_bytes: int) -> int:
    """KV-cache bytes one token takes per sample: a key and a value per layer and kv head. The engine's cache
    holds every position of every layer (windows limit what a step reads, not what is stored)."""
    return 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * dtype_bytes


def kv_cache_bytes_read(c: GPTConfig, position: int, dtype_bytes: int) -> int:
    """KV-cache bytes the decode step at `position` reads per sample: the attended keys and their values."""
    return 2 * c.n_kv_head * (c.n_embd // c.n_head) * dtype_bytes * sum(attended_keys(c, position))
