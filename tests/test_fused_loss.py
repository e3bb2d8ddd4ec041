"""nanochat.fused_loss: the chunked output layer + softcap + cross-entropy against the plain path (F.linear, crop,
softcap, F.cross_entropy): losses and gradients, every reduction, ignored targets, a padded vocab, chunks that do
not divide the rows, bf16, eager inside torch.compile; and that no (rows, vocab) tensor is kept for backward."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from nanochat import fused_loss
from nanochat.fused_loss import softcap_cross_entropy
from test_gpt import small_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS, DIM, VOCAB, PADDED, SOFTCAP = 37, 24, 100, 128, 15.0


def plain_loss(x, weight, targets, reduction):
    """What GPT.forward computes with fused_loss off: logits in x's dtype, then fp32."""
    logits = F.linear(x, weight.to(x.dtype))[:, :VOCAB].float()
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def inputs(dtype=torch.float32, seed=0):
    """Hidden states, an fp32 master weight with padding rows, and targets with ignored rows. The weight is large
    enough that the softcap bends the logits (|logit| up to ~14), so its gradient is exercised."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, DIM, generator=generator).to(dtype).requires_grad_()
    weight = (2 * torch.randn(PADDED, DIM, generator=generator)).requires_grad_()
    targets = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    targets[::5] = -1
    return x, weight, targets


def loss_and_grads(loss_fn, x, weight, targets, reduction):
    """The loss and the gradients of x and weight, for an upstream gradient that differs per row ("none")."""
    x.grad = weight.grad = None
    loss = loss_fn(x, weight, targets, reduction)
    upstream = torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad, weight.grad


def fused(chunk_rows=None, compiled=False):
    return lambda x, weight, targets, reduction: softcap_cross_entropy(x, weight, targets, VOCAB, SOFTCAP, reduction,
                                                                       chunk_rows, compiled)


def assert_close_relative(actual, expected, tolerance):
    """Each tensor within `tolerance` of the expected one's largest magnitude."""
    assert (actual - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 64])  # 8 leaves a last chunk of 5; 64 is more than the rows
def test_fp32_matches_the_plain_path(reduction, chunk_rows):
    x, weight, targets = inputs()
    expected = loss_and_grads(plain_loss, x, weight, targets, reduction)
    loss, grad_x, grad_weight = loss_and_grads(fused(chunk_rows), x, weight, targets, reduction)
    torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=1e-6 * expected[0].abs().max().item())
    assert_close_relative(grad_x, expected[1], 1e-6)
    assert_close_relative(grad_weight, expected[2], 1e-6)
    assert not grad_weight[VOCAB:].any()  # the padding rows take no gradient, as with the cropped logits
    if reduction == "none":
        assert loss.shape == (ROWS,) and not loss[targets == -1].any()


def test_bf16_activations_match_the_plain_path():
    """x in bf16 with an fp32 master weight, as on GPU: the matmuls in bf16, the rest in fp32; the gradients
    agree to bf16's precision (the lm_head's is summed over chunks in fp32, the plain path rounds it once)."""
    x, weight, targets = inputs(torch.bfloat16)
    expected = loss_and_grads(plain_loss, x, weight, targets, "mean")
    loss, grad_x, grad_weight = loss_and_grads(fused(8), x, weight, targets, "mean")
    assert grad_x.dtype == torch.bfloat16 and grad_weight.dtype == torch.float32
    torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=0)
    assert_close_relative(grad_x, expected[1], 1e-2)
    assert_close_relative(grad_weight, expected[2], 1e-2)


def test_all_targets_ignored_gives_nan_mean_and_zero_gradients():
    x, weight, targets = inputs()
    targets[:] = -1
    loss, grad_x, grad_weight = loss_and_grads(fused(8), x, weight, targets, "sum")
    assert loss == 0 and not grad_x.any() and not grad_weight.any()
    assert softcap_cross_entropy(x, weight, targets, VOCAB, SOFTCAP).isnan()  # 0/0, as F.cross_entropy's mean


def test_keeps_no_logits_for_backward():
    """What autograd saves for backward is x, the weight, the targets and one float a row: nothing vocab-sized
    per row, so memory does not grow with rows x vocab (the plain path keeps several such tensors)."""
    x, weight, targets = inputs()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        softcap_cross_entropy(x, weight, targets, VOCAB, SOFTCAP, chunk_rows=8)
    assert saved and max(saved) == weight.numel() < ROWS * VOCAB
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        plain_loss(x, weight, targets, "mean")
    assert max(saved) == ROWS * VOCAB


def test_runs_eager_inside_a_compiled_model():
    """Inside torch.compile (aot_eager: traced forward and backward, no C compiler needed) the eager results; the
    loss itself stays out of the graph (a graph break), where the partitioner would otherwise merge backward's
    recomputed chunk logits with forward's and keep them all."""
    x, weight, targets = inputs()
    expected = loss_and_grads(fused(8), x, weight, targets, "mean")

    def around(x, weight, targets, reduction):  # compiled work on both sides of the loss
        return softcap_cross_entropy(x * 1.0, weight, targets, VOCAB, SOFTCAP, reduction, 8) * 1.0

    compiled = torch.compile(around, backend="aot_eager")
    for actual, want in zip(loss_and_grads(compiled, x, weight, targets, "mean"), expected):
        torch.testing.assert_close(actual, want)
    assert torch._dynamo.explain(around)(x, weight, targets, "mean").graph_break_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_of_a_chunk_match_the_plain_path(monkeypatch, dtype):
    """On a CPU a chunk's elementwise work runs in pieces (rows_per_piece): pieces of 3 rows in chunks of 8, a last
    piece and a last chunk shorter, every reduction: the plain path's loss and gradients."""
    monkeypatch.setattr(fused_loss, "CPU_PIECE_BYTES", 3 * 4 * VOCAB)
    assert fused_loss.rows_per_piece(VOCAB, torch.device("cpu")) == 3
    x, weight, targets = inputs(dtype)
    for reduction in ("mean", "sum", "none"):
        expected = loss_and_grads(plain_loss, x, weight, targets, reduction)
        for actual, want in zip(loss_and_grads(fused(8), x, weight, targets, reduction), expected):
            assert_close_relative(actual.float(), want.float(), 1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not shutil.which("g++"), reason="inductor's CPU kernels need a C++ compiler (.ci/setup installs g++)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_chunks_match_the_plain_path(reduction, dtype):
    """The chunks' elementwise work torch.compile'd (inductor, as where the training steps compile: one in-place
    kernel, tanh in its exp form on a CPU), a last chunk of another size included: the plain path's loss and
    gradients, within the dtype's rounding."""
    x, weight, targets = inputs(dtype)
    expected = loss_and_grads(plain_loss, x, weight, targets, reduction)
    for actual, want in zip(loss_and_grads(fused(8, compiled=True), x, weight, targets, reduction), expected):
        assert_close_relative(actual.float(), want.float(), 1e-6 if dtype == torch.float32 else 1e-2)


def test_model_loss_and_gradients_match_the_plain_path_and_accumulate():
    """GPT.forward with fused_loss on and off: the same loss and every parameter's gradient, over two
    accumulated backward passes (gradient accumulation adds into .grad as usual)."""
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, dims=1)
    targets[0, :5] = -1
    grads = []
    for fused_loss in (False, True):
        model = small_model()
        model.fused_loss = fused_loss
        losses = [model(idx, targets) for _ in range(2)]
        for loss in losses:
            loss.backward()
        grads.append((losses[0].detach(), {name: p.grad for name, p in model.named_parameters()}))
    (plain, plain_grads), (loss, fused_grads) = grads
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    for name, grad in plain_grads.items():
        assert_close_relative(fused_grads[name], grad, 1e-5)
