"""The GPT model, matching upstream nanochat's architecture, parameter names and shapes.

Features (as in upstream karpathy/nanochat's nanochat/gpt.py):
- rotary position embeddings (base 100000), half-split layout, tables kept as non-persistent buffers
- QK-norm (parameter-free RMSNorm on q and k after rotary), then q and k each scaled by 1.2
- grouped-query attention (n_kv_head divides n_head), no biases anywhere
- parameter-free RMSNorm: right after the token embedding, before attention/MLP, and before lm_head
- ReLU^2 MLP with a 4x hidden width
- untied token embedding `transformer.wte` and `lm_head`; vocab padded to a multiple of 64, logits cropped
- logit softcap 15 (tanh), loss in fp32 with ignore_index=-1; with targets, by default without the full logits
  (`fused_loss`, nanochat/fused_loss.py); `fused_loss = False` is upstream's plain path, bit for bit
- sliding-window pattern (e.g. "SSSL") tiled over layers, last layer always long
- value embeddings (ResFormer) on alternating layers ending at the last one, mixed into v through a
  per-kv-head gate reading the first 12 channels of the block input
- smear: each position's embedding gets a gated share of the previous token's embedding
- backout: the residual at layer n_layer // 2 is subtracted (scaled) before the final norm
- per-layer `resid_lambdas` (residual scale) and `x0_lambdas` (re-injection of the embedding)

Build on the meta device, materialize, then call `init_weights()` (see `GPT.build`). Weights are fp32
master copies; on CUDA with bf16 support the embeddings are stored in bf16 and activations run in bf16
(`Linear` casts its weight to the activation dtype); on CPU everything stays fp32. The compute dtype comes
from nanochat.distributed.compute_dtype (NANOCHAT_DTYPE overrides it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import KVCache, attention
from nanochat.distributed import compute_dtype
from nanochat.fused_loss import IGNORE_INDEX, softcap_cross_entropy
from nanochat.model_config import (SMEAR_CHANNELS, VE_GATE_CHANNELS, GPTConfig, flops_per_token, has_ve,
                                   model_config_for_depth, num_matmul_params, padded_vocab_size, window_sizes_for)

SOFTCAP = 15.0
ROPE_BASE = 100000
QK_SCALE = 1.2


def default_compute_dtype(device) -> torch.dtype:
    return compute_dtype(torch.device(device).type)[0]


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension (x is (B, T, H, D); cos/sin (1, T, 1, D/2))."""
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


class Linear(nn.Linear):
    """nn.Linear (no bias) whose fp32 master weight is cast to the activation dtype in forward."""

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        assert config.n_kv_head <= config.n_head and config.n_head % config.n_kv_head == 0, \
            "n_kv_head must divide n_head"
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(self.n_embd, kv_dim, bias=False)
        self.c_v = Linear(self.n_embd, kv_dim, bias=False)
        self.c_proj = Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = VE_GATE_CHANNELS
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value residual: gate in (0, 3) per kv head, from the first channels of the block input
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        if kv_cache is None:
            y = attention(q, k, v, causal=True, window=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = attention(q, k, v, causal=True, window=window_size, k_cache=k_cache, v_cache=v_cache,
                          cache_seqlens=kv_cache.cache_seqlens)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, pad_vocab_size_to: int = 64):
        """Shapes only: this usually runs under torch.device("meta"); real values come from init_weights()."""
        super().__init__()
        self.config = config
        self.window_sizes = window_sizes_for(config)
        vocab = padded_vocab_size(config.vocab_size, pad_vocab_size_to)
        self.padded_vocab_size, self.pad_vocab_size_to = vocab, pad_vocab_size_to
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, vocab, bias=False)
        self.fused_loss = True  # the loss in row chunks, never the whole logits (training stages set cfg.fused_loss)
        self.compiled_loss = False  # its chunks' elementwise work compiled (set where the training steps compile)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(vocab, kv_dim) for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        # rotary tables, over-allocated 10x so KV-cache generation can run past sequence_len
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim, dtype=torch.float32)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # ---------------------------------------------------------------------------------------------- building

    @classmethod
    def build(cls, config: GPTConfig, device="cpu", compute_dtype: torch.dtype | None = None) -> "GPT":
        """Meta-device construction, materialization on `device`, then init_weights()."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights(compute_dtype=compute_dtype)
        return model

    @torch.no_grad()
    def init_weights(self, compute_dtype: torch.dtype | None = None):
        """Upstream's init: embeddings normal(0.8), lm_head normal(0.001), q/k/v uniform with std
        1/sqrt(n_embd), c_fc at 0.4x that, output projections zero, value embeddings like c_v, small positive
        gates, per-layer lambdas ramping with depth. Then the rotary tables in the compute dtype, and the
        embeddings cast to the compute dtype (kept fp32 when that is fp16, for the grad scaler)."""
        cfg = self.config
        device = self.transformer.wte.weight.device
        dtype = compute_dtype or default_compute_dtype(device)
        if self.transformer.wte.weight.dtype != torch.float32:  # re-initialising a cast model
            self.transformer.wte.float()
            for ve in self.value_embeds.values():
                ve.float()

        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3 ** 0.5 * cfg.n_embd ** -0.5  # uniform(-s, s) has std 1/sqrt(n_embd)
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        n = cfg.n_layer  # the ramps in Python floats, as upstream: in fp32 some layers' values differ by an ulp
        self.resid_lambdas.copy_(torch.tensor([1.15 - (0.10 * i / max(n - 1, 1)) for i in range(n)]))
        self.x0_lambdas.copy_(torch.tensor([0.20 - (0.15 * i / max(n - 1, 1)) for i in range(n)]))
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)

        head_dim = cfg.n_embd // cfg.n_head
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim, device=device, dtype=dtype)
        if dtype != torch.float16:
            self.transformer.wte.to(dtype=dtype)
            for ve in self.value_embeds.values():
                ve.to(dtype=dtype)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=ROPE_BASE, device=None, dtype=torch.float32):
        if device is None:
            device = self.transformer.wte.weight.device
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return cos[None, :, None, :], sin[None, :, None, :]

    @torch.no_grad()
    def for_inference(self) -> "GPT":
        """Eval mode, with every Linear's weight cast to the compute dtype once: a model that will not train needs
        no fp32 master weights, and its forward then casts nothing (a bf16 decode step otherwise converts every
        weight matrix, per token). The same values as the cast in forward, so the same outputs."""
        self.eval()
        for module in self.modules():
            if type(module) is Linear:
                module.weight.data = module.weight.data.to(self.compute_dtype)
        return self

    # ---------------------------------------------------------------------------------------------- queries

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype, fixed by init_weights (the rotary tables are stored in it)."""
        return self.cos.dtype

    def new_kv_cache(self, batch_size: int, seq_len: int | None = None) -> KVCache:
        return KVCache.for_model(self, batch_size, seq_len)

    def num_matmul_params(self) -> int:
        """From the config alone (nanochat.model_config), so it stays right when modules are swapped (float8)."""
        return num_matmul_params(self.config, self.pad_vocab_size_to)

    def estimate_flops(self) -> int:
        """Training FLOPs per token, from the config alone (nanochat.model_config.flops_per_token)."""
        return flops_per_token(self.config, self.pad_vocab_size_to)

    def num_scaling_params(self) -> dict[str, int]:
        """Upstream's parameter counts by group: wte, value_embeds, lm_head, transformer_matrices, scalars, total."""
        wte = sum(p.numel() for p in self.transformer.wte.parameters())
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = sum(p.numel() for p in self.lm_head.parameters())
        transformer_matrices = sum(p.numel() for p in self.transformer.h.parameters())
        scalars = (self.resid_lambdas.numel() + self.x0_lambdas.numel() + self.smear_gate.weight.numel()
                   + self.smear_lambda.numel() + self.backout_lambda.numel())
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        assert total == sum(p.numel() for p in self.parameters()), "parameter count mismatch"
        return {"wte": wte, "value_embeds": value_embeds, "lm_head": lm_head,
                "transformer_matrices": transformer_matrices, "scalars": scalars, "total": total}

    def param_counts(self) -> dict[str, int]:
        """num_scaling_params() plus the summary figures: `non_embedding` = total minus the token and value
        embedding tables; `scaling` = transformer_matrices + lm_head (what upstream's base_train multiplies
        by target_param_data_ratio)."""
        counts = self.num_scaling_params()
        counts["non_embedding"] = counts["total"] - counts["wte"] - counts["value_embeds"]
        counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
        return counts

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split as upstream's setup_optimizer splits them (every parameter exactly once):
        matrix (all of transformer.h, incl. value-embedding gates; Muon upstream), embedding (wte),
        lm_head, value_embeds, resid (resid_lambdas), x0 (x0_lambdas), smear (smear gate + smear/backout
        lambdas); the last six are AdamW groups upstream."""
        groups = {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": list(self.transformer.wte.parameters()),
            "lm_head": list(self.lm_head.parameters()),
            "value_embeds": list(self.value_embeds.parameters()),
            "resid": [self.resid_lambdas],
            "x0": [self.x0_lambdas],
            "smear": [self.smear_gate.weight, self.smear_lambda, self.backout_lambda],
        }
        seen = [id(p) for ps in groups.values() for p in ps]
        assert len(seen) == len(set(seen)) and set(seen) == {id(p) for p in self.parameters()}, \
            "param_groups must cover every parameter exactly once"
        return groups

    # ---------------------------------------------------------------------------------------------- forward

    def _smear(self, x: torch.Tensor, kv_cache) -> torch.Tensor:
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1}, on normalized embeddings."""
        lam = self.smear_lambda.to(x.dtype)
        prev = None
        if kv_cache is not None:
            prev = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:, :]
        if prev is None:  # no earlier token known: the first position is left as is
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        shifted = torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        return x + gate * shifted

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean"):
        """Logits (B, T, vocab_size) in fp32 when targets is None; otherwise the cross-entropy loss
        (ignore_index=-1; `loss_reduction` as F.cross_entropy, "none" gives shape (B*T,)).
        With a kv_cache, idx continues the cached sequence and the cache is advanced by T."""
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        assert T0 + T <= self.cos.size(1), f"sequence grew past the rotary tables: {T0 + T} > {self.cos.size(1)}"
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]

        x = norm(self.transformer.wte(idx).to(self.cos.dtype))
        x = self._smear(x, kv_cache)
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            key = str(i)
            ve = self.value_embeds[key](idx).to(x.dtype) if key in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)
        x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)

        if targets is not None and self.fused_loss and type(self.lm_head) is Linear:  # fp8's lm_head: plain path
            return softcap_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                         self.config.vocab_size, SOFTCAP, loss_reduction,
                                         compiled=self.compiled_loss)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=loss_reduction)


__all__ = ["GPTConfig", "GPT", "model_config_for_depth", "default_compute_dtype", "window_sizes_for",
           "padded_vocab_size", "has_ve", "norm", "apply_rotary_emb", "Linear"]
