"""GPU-only checks (skipped without CUDA; they live in the suite for lent GPUs and cluster nodes): the GPU check's
rows at the dry run's sizes (python -m experiments.bench gpu: bf16 agrees with fp32, every available attention
backend with a reference, torch.compile with eager, fp8 on SM89+), evaluation with fp8 off gives the bf16 numbers,
and an asynchronous checkpoint snapshots the weights of the step it was taken at."""

from dataclasses import replace

import pytest
import torch

from experiments.attention_check import Skipped
from experiments.gpu_check import DRY_PLAN, GpuCheck
from nanochat.checkpoint import CheckpointManager
from nanochat.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def passes(check_name: str, *args) -> None:
    """The GPU check's row on the GPU, at the dry run's small sizes and with inductor; skipped where it is."""
    check = GpuCheck(replace(DRY_PLAN, device=torch.device("cuda"), compile_backend="inductor"))
    try:
        passed, figure = getattr(check, check_name)(*args)
    except Skipped as reason:
        pytest.skip(str(reason))
    assert passed, figure


def test_bf16_agrees_with_fp32():
    passes("bf16_vs_fp32")


@pytest.mark.parametrize("backend", ["fa3", "fa2", "flex", "sdpa"])
def test_attention_backend_agrees_with_reference(backend):
    passes("attention", backend)


def test_compile_matches_eager():
    passes("compile_on_off")


def test_fp8_trains_on_sm89():
    passes("fp8_on_off")


def test_fp8_off_evaluates_with_the_bf16_numbers():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs SM89+")
    pytest.importorskip("torchao")
    from nanochat.fp8 import enable_fp8, fp8_off
    torch.manual_seed(0)
    model = GPT.build(GPTConfig(sequence_len=256, vocab_size=1000, n_layer=4, n_head=4, n_kv_head=2, n_embd=256),
                      device="cuda", compute_dtype=torch.bfloat16)
    x, y = (torch.randint(0, 1000, (4, 256), device="cuda") for _ in range(2))
    with torch.no_grad():
        bf16 = model(x, y)
    enable_fp8(model, torch.device("cuda"), "tensorwise")
    with torch.no_grad(), fp8_off(model):  # evaluation: the bf16 model's numbers exactly, then fp8 again
        assert (model(x, y) - bf16).abs() < 1e-4  # fp8's own error on this loss is ~1e-2
    assert any("Float8" in type(m).__name__ for m in model.modules())


def test_async_checkpoint_snapshots_the_step(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=1000, n_layer=4, n_head=4, n_kv_head=2, n_embd=256)
    model = GPT.build(config, device="cuda")
    manager = CheckpointManager(tmp_path, async_save=True)
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    manager.save(1, model.state_dict(), {}, {}, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next step changes the weights while the writer may still run
    manager.wait()
    saved = manager.load()["model"]
    assert all(torch.equal(saved[k], before[k]) for k in before)
