"""GPU-only checks (skipped without CUDA; they live in the suite for lent GPUs and cluster nodes):
bf16 agrees with fp32, every available attention backend agrees with a reference, torch.compile matches eager,
fp8 trains on SM89+, and an asynchronous checkpoint snapshots the weights of the step it was taken at."""

import pytest
import torch

from nanochat import attention as attn
from nanochat.checkpoint import CheckpointManager
from nanochat.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = GPTConfig(sequence_len=256, vocab_size=1000, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                   window_pattern="SSSL")


def batch(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randint(0, 1000, (4, 256), device="cuda", generator=g),
            torch.randint(0, 1000, (4, 256), device="cuda", generator=g))


def built(dtype):
    torch.manual_seed(0)
    return GPT.build(CONFIG, device="cuda", compute_dtype=dtype)


def test_bf16_agrees_with_fp32():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    x, y = batch()
    losses, grads = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = built(dtype)
        loss = model(x, y)
        loss.backward()
        losses[dtype] = loss.item()
        grads[dtype] = torch.cat([p.grad.float().flatten() for p in model.transformer.h.parameters()])
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) / losses[torch.float32] < 1e-2
    cosine = torch.nn.functional.cosine_similarity(grads[torch.bfloat16], grads[torch.float32], dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize("window", [None, (64, 0)])
def test_attention_backends_agree_with_reference(window):
    torch.manual_seed(0)
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 256, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    reference = None
    for backend in attn.available_backends():
        attn.set_backend(backend)
        try:
            out = attn.attention(q, k, v, causal=True, window=window).float()
        finally:
            attn.set_backend("auto")
        if reference is None:
            attn.set_backend("sdpa")
            reference = attn.attention(q.float(), k.float(), v.float(), causal=True, window=window)
            attn.set_backend("auto")
        assert (out - reference).abs().max() < 3e-2, backend


def test_compile_matches_eager():
    x, y = batch()
    model = built(None)
    eager = model(x, y).item()
    compiled = torch.compile(model, dynamic=False)(x, y).item()
    assert abs(compiled - eager) / eager < 1e-3


def test_fp8_trains_on_sm89():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs SM89+")
    pytest.importorskip("torchao")
    from nanochat.fp8 import enable_fp8, fp8_off
    model = built(torch.bfloat16)
    x, y = batch()
    with torch.no_grad():
        bf16 = model(x, y)
    enable_fp8(model, torch.device("cuda"), "tensorwise")
    loss = model(x, y)
    loss.backward()
    assert torch.isfinite(loss) and any("Float8" in type(m).__name__ for m in model.modules())
    with torch.no_grad(), fp8_off(model):  # evaluation: the bf16 model's numbers exactly, then fp8 again
        assert (model(x, y) - bf16).abs() < 1e-4  # fp8's own error on this loss is ~1e-2
    assert any("Float8" in type(m).__name__ for m in model.modules())


def test_async_checkpoint_snapshots_the_step(tmp_path):
    model = built(None)
    manager = CheckpointManager(tmp_path, async_save=True)
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    manager.save(1, model.state_dict(), {}, {}, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next step changes the weights while the writer may still run
    manager.wait()
    saved = manager.load()["model"]
    assert all(torch.equal(saved[k], before[k]) for k in before)
