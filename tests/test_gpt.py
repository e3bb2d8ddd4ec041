"""nanochat.gpt: upstream-exact shapes and counts, forward/loss semantics, KV-cache decoding, training."""

import pytest
import torch
import torch.nn.functional as F

from experiments.random_model import every_path_active
from nanochat.attention import KVCache
from nanochat.gpt import GPT, GPTConfig, has_ve, model_config_for_depth, window_sizes_for
from nanochat.model_config import param_counts


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = dict(sequence_len=64, vocab_size=100, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SSSL")


def small_model(seed=0, perturb=True, **overrides):
    """A random model whose every path does something: the zero-initialized output projections and the
    smear/backout scalars get random values, so attention, value embeddings and smear all matter."""
    torch.manual_seed(seed)
    model = GPT.build(GPTConfig(**{**SMALL, **overrides}), device="cpu")
    return every_path_active(model) if perturb else model.eval()


# ----------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("depth,expected", [(20, 896_533_746), (24, 1_384_122_122), (26, 1_681_786_938),
                                            (32, 2_818_575_450)])
def test_parameter_counts_match_upstream(depth, expected):
    config = model_config_for_depth(depth, vocab_size=32768, sequence_len=2048)
    with torch.device("meta"):
        model = GPT(config)
    counts = model.param_counts()
    assert counts["total"] == expected
    assert sum(p.numel() for p in model.parameters()) == expected
    assert counts["scaling"] == counts["transformer_matrices"] + counts["lm_head"]
    assert counts["non_embedding"] == expected - counts["wte"] - counts["value_embeds"]
    assert counts["scalars"] == 2 * depth + 24 + 2
    assert set(model.num_scaling_params()) == {"wte", "value_embeds", "lm_head", "transformer_matrices",
                                               "scalars", "total"}


def test_depth_dial():
    c = model_config_for_depth(20, vocab_size=32768, sequence_len=2048)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.window_pattern) == (20, 1280, 10, 10, "SSSL")
    c = model_config_for_depth(7, vocab_size=1000, sequence_len=512)  # 448 rounds up to 512
    assert (c.n_embd, c.n_head, c.sequence_len, c.vocab_size) == (512, 4, 512, 1000)
    c = model_config_for_depth(6, 1000, 512, head_dim=64, aspect_ratio=48, window_pattern="L")
    assert (c.n_embd, c.n_head, c.window_pattern) == (320, 5, "L")


def test_config_defaults_are_upstreams():
    c = GPTConfig()
    assert (c.sequence_len, c.vocab_size, c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.window_pattern) == \
        (2048, 32768, 12, 6, 6, 768, "SSSL")


def test_window_pattern():
    c = GPTConfig(sequence_len=2048, n_layer=6, window_pattern="SSSL")
    assert window_sizes_for(c) == [(512, 0)] * 3 + [(2048, 0), (512, 0), (2048, 0)]  # last layer always long
    assert window_sizes_for(GPTConfig(sequence_len=1000, n_layer=3, window_pattern="sl")) == \
        [(256, 0), (1000, 0), (1000, 0)]  # 250 rounds up to a multiple of 128
    assert window_sizes_for(GPTConfig(n_layer=3, window_pattern="L")) == [(2048, 0)] * 3
    with pytest.raises(ValueError):
        window_sizes_for(GPTConfig(window_pattern="SXL"))


def test_value_embedding_layers():
    assert [i for i in range(6) if has_ve(i, 6)] == [1, 3, 5]
    assert [i for i in range(5) if has_ve(i, 5)] == [0, 2, 4]


def test_state_dict_keys_and_shapes():
    model = small_model(perturb=False)
    sd = model.state_dict()
    expected = {
        "transformer.wte.weight": (128, 128),  # vocab 100 padded to 128
        "lm_head.weight": (128, 128),
        "resid_lambdas": (4,), "x0_lambdas": (4,),
        "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,),
        "value_embeds.1.weight": (128, 64), "value_embeds.3.weight": (128, 64),
    }
    for i in range(4):
        expected.update({
            f"transformer.h.{i}.attn.c_q.weight": (128, 128),
            f"transformer.h.{i}.attn.c_k.weight": (64, 128),
            f"transformer.h.{i}.attn.c_v.weight": (64, 128),
            f"transformer.h.{i}.attn.c_proj.weight": (128, 128),
            f"transformer.h.{i}.mlp.c_fc.weight": (512, 128),
            f"transformer.h.{i}.mlp.c_proj.weight": (128, 512),
        })
        if i % 2 == 1:
            expected[f"transformer.h.{i}.attn.ve_gate.weight"] = (2, 12)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected  # no rotary buffers in here
    assert model.cos.shape == (1, 640, 1, 16) and model.sin.shape == (1, 640, 1, 16)

    other = small_model(seed=1, perturb=False)
    other.load_state_dict(sd, strict=True)
    idx = torch.randint(0, 100, (2, 10))
    assert torch.equal(other(idx), model(idx))


def test_init_weights():
    model = small_model(perturb=False)
    assert model.compute_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # CPU: embeddings stay fp32
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    # at six layers, upstream's values (Python floats, then stored in fp32) to the bit; an fp32 ramp is an ulp off
    # in layers 3, 4 (resid) and 5 (x0), which is enough for the loss curves to part after ~16 steps
    six = small_model(perturb=False, n_layer=6)
    assert six.resid_lambdas.tolist() == [1.149999976158142, 1.1299999952316284, 1.1100000143051147,
                                          1.090000033378601, 1.0700000524520874, 1.0499999523162842]
    assert six.x0_lambdas.tolist() == [0.20000000298023224, 0.17000000178813934, 0.14000000059604645,
                                       0.10999999940395355, 0.07999999821186066, 0.05000000074505806]
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert 0.7 < model.transformer.wte.weight.std().item() < 0.9
    s = 3 ** 0.5 * 128 ** -0.5
    assert model.transformer.h[0].mlp.c_fc.weight.abs().max().item() <= 0.4 * s
    assert model.transformer.h[0].attn.c_q.weight.abs().max().item() > 0.9 * s


def test_param_groups_cover_everything_once():
    model = small_model(perturb=False)
    groups = model.param_groups()
    assert list(groups) == ["matrix", "embedding", "lm_head", "value_embeds", "resid", "x0", "smear"]
    flat = [p for ps in groups.values() for p in ps]
    assert len(flat) == len(list(model.parameters())) == len({id(p) for p in flat})
    assert groups["embedding"] == [model.transformer.wte.weight]
    assert all(p.ndim == 2 for p in groups["matrix"])


def test_estimate_flops():
    flops = []
    for depth in (4, 8, 12):
        with torch.device("meta"):
            model = GPT(model_config_for_depth(depth, vocab_size=32768, sequence_len=2048))
        f = model.estimate_flops()
        # upstream's formula: 6 * (every Linear's weight, the smear gate's too) + attention with windows
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        c = model.config
        attn = sum(12 * c.n_head * (c.n_embd // c.n_head) * min(w, c.sequence_len) for w, _ in model.window_sizes)
        assert f == 6 * linear + attn
        counts = model.num_scaling_params()
        assert linear == counts["transformer_matrices"] + counts["lm_head"] + model.smear_gate.weight.numel()
        flops.append(f)
    assert 0 < flops[0] < flops[1] < flops[2]
    with torch.device("meta"):
        short = GPT(GPTConfig(window_pattern="SSSL"))
        full = GPT(GPTConfig(window_pattern="L"))
    assert short.estimate_flops() < full.estimate_flops()  # windows shrink the attention term


@pytest.mark.parametrize("depth,vocab,pattern", [(2, 8192, "SSSL"), (4, 8191, "L"), (12, 32768, "SSSL"),
                                                 (13, 65536, "SL"), (24, 32768, "SSSL")])
def test_closed_form_counts_equal_the_built_model(depth, vocab, pattern):
    """What the login node plans with (no torch) is what the model has: every group, and odd depths and vocabs."""
    config = model_config_for_depth(depth, vocab_size=vocab, sequence_len=2048, window_pattern=pattern)
    with torch.device("meta"):
        model = GPT(config)
    assert param_counts(config) == model.param_counts()


# ----------------------------------------------------------------------------------------------- forward


def test_logits_shape_and_vocab_crop():
    model = small_model()
    idx = torch.randint(0, 100, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 100) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # softcap
    # the cropped logits are exactly the first vocab_size columns of the padded head
    with torch.no_grad():
        model.lm_head.weight[100:].fill_(1e3)
    torch.testing.assert_close(model(idx), logits)


def test_loss_matches_manual_cross_entropy():
    model = small_model()
    idx = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (2, 16))
    targets[0, :5] = -1
    targets[1, -1] = -1
    logits = model(idx)
    manual = F.cross_entropy(logits.reshape(-1, 100), targets.reshape(-1), ignore_index=-1)
    loss = model(idx, targets)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, manual)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (32,)
    keep = targets.reshape(-1) != -1
    assert not per_token[~keep].any()
    torch.testing.assert_close(per_token[keep].mean(), loss)
    i = 7
    torch.testing.assert_close(per_token[i], -F.log_softmax(logits.reshape(-1, 100)[i], -1)[targets.reshape(-1)[i]])
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), per_token.sum())


def test_causality():
    model = small_model()
    idx = torch.randint(0, 100, (1, 24))
    changed = idx.clone()
    changed[0, 15] = (idx[0, 15] + 1) % 100
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-4


@pytest.mark.parametrize("windows", ["upstream", "narrow"])
def test_kv_cache_decode_matches_full_forward(windows):
    model = small_model(seed=3)
    if windows == "narrow":
        # at sequence_len 64 upstream's short window (rounded up to 128) covers everything; shrink it
        model.window_sizes = [(5, 0), (5, 0), (5, 0), (64, 0)]
    torch.manual_seed(4)
    idx = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=2)
        assert cache.k_cache.shape == (4, 2, 64, 2, 32)
        steps = [model(idx[:, :12], kv_cache=cache), model(idx[:, 12:17], kv_cache=cache)]  # prefill + chunk
        for t in range(17, 30):
            steps.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == 30
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[-1][:, -1], full[:, -1], atol=1e-4, rtol=1e-4)


def test_kv_cache_expand_for_samples():
    model = small_model(seed=5)
    model.window_sizes = [(4, 0), (4, 0), (4, 0), (64, 0)]
    prompt = torch.randint(0, 100, (1, 9))
    nxt = torch.randint(0, 100, (3, 1))
    with torch.no_grad():
        one = KVCache.for_model(model, batch_size=1)
        model(prompt, kv_cache=one)
        many = one.expand(3)
        out = model(nxt, kv_cache=many)[:, -1]
        full = model(torch.cat([prompt.expand(3, -1), nxt], dim=1))[:, -1]
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)


def test_windows_change_the_model():
    model = small_model(seed=6)
    idx = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        wide = model(idx)
        model.window_sizes = [(3, 0), (3, 0), (3, 0), (64, 0)]
        narrow = model(idx)
    torch.testing.assert_close(wide[:, :4], narrow[:, :4])
    assert (wide[:, 20:] - narrow[:, 20:]).abs().max() > 1e-4


def test_a_few_adamw_steps_reduce_the_loss():
    model = small_model(seed=7, perturb=False).train()
    torch.manual_seed(8)
    idx = torch.randint(0, 100, (4, 32))
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def reference_forward(model, idx):
    """Upstream's forward written out functionally from the state dict (naive attention), to pin the math."""
    sd, c = model.state_dict(), model.config
    B, T = idx.shape
    H, Hkv, D = c.n_head, c.n_kv_head, c.n_embd // c.n_head
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps)
    inv_freq = 1.0 / (100000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = freqs.cos()[None, :, None], freqs.sin()[None, :, None]

    def rope(t):
        a, b = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], -1)

    x = rms(sd["transformer.wte.weight"][idx])
    gate = sd["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ sd["smear_gate.weight"].T)
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], 1)
    x0, saved = x, None
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        if f"value_embeds.{i}.weight" in sd:
            g = 3 * torch.sigmoid(h[..., :12] @ sd[p + "attn.ve_gate.weight"].T)
            v = v + g[..., None] * sd[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
        q, k = rms(rope(q)) * 1.2, rms(rope(k)) * 1.2
        left = model.window_sizes[i][0]
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / D ** 0.5
        qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
        s = s.masked_fill(~((ki <= qi) & (qi - ki <= left)), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, T, -1)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        h = rms(x)
        x = x + torch.relu(h @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
        if i == c.n_layer // 2:
            saved = x
    x = rms(x - sd["backout_lambda"] * saved)
    logits = (x @ sd["lm_head.weight"].T)[..., :c.vocab_size]
    return 15 * torch.tanh(logits / 15)


def test_forward_matches_functional_reference():
    model = small_model(seed=9)
    model.window_sizes = [(6, 0), (6, 0), (6, 0), (64, 0)]
    with torch.no_grad():
        model.resid_lambdas.uniform_(0.5, 1.5)
        model.x0_lambdas.uniform_(-0.5, 0.5)
        model.backout_lambda.fill_(0.6)
    idx = torch.randint(0, 100, (2, 25))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_forward(model, idx), atol=1e-4, rtol=1e-4)


def test_for_inference_casts_the_weights_once_and_computes_the_same():
    """A bf16 model made for inference holds its Linear weights in bf16 (nothing to cast per forward) and gives the
    same logits, bit for bit, as casting them in every forward."""
    torch.manual_seed(0)
    model = every_path_active(GPT.build(GPTConfig(**SMALL), device="cpu", compute_dtype=torch.bfloat16)).eval()
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.no_grad():
        expected = model(idx)
        model.for_inference()
        assert model.lm_head.weight.dtype == torch.bfloat16 and not model.training
        assert torch.equal(model(idx), expected)
