"""The output layer, its logit softcap and the cross-entropy as one autograd function over chunks of rows, so the
(rows, vocab) logits are never whole in memory.

The plain path (GPT.forward with fused_loss off, as upstream) keeps two whole fp32 copies of the logits for
backward (the softcap's tanh and the log-softmax) and makes more on the way (the matmul's output, the softcap's
steps, a gradient for each in backward); at d6 with 32 x 512 rows and a 32,768 vocab each copy is 2 GiB. Here a
chunk of rows goes through matmul, softcap and log-sum-exp, and two chunk-sized fp32 buffers are the most that
exists at a time. A training loss (a scalar: "mean" or "sum") makes the chunk's share of the gradients right
there, for an incoming gradient of 1, and keeps them for backward to scale: the output layer's usual 3 matmul
units. Per-row losses ("none": RL weights each row in backward) keep one float a row (the log-sum-exp) and
backward recomputes the chunk's logits: 4 units.

Numerics are the plain path's: the matmul in the activations' dtype (bf16 on GPU, fp32 on CPU) with the weight
cast to it as `Linear` casts it, everything after it in fp32, gradients flowing back through the same casts. Only
the order of the sums differs (the lm_head gradient is summed over chunks in fp32): in fp32 the loss and gradients
match the plain path to ~1e-6 relative (tests/test_fused_loss.py).
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1  # targets equal to this add nothing to the loss and are not counted (as F.cross_entropy's)
# A chunk's fp32 logits are about this many bytes. Measured at d6 on CPU (32 x 512 rows, 32,768 vocab, fp32), one
# forward and backward of the whole model, peak RSS with glibc unmapping freed blocks at once (MALLOC_MMAP_THRESHOLD_
# =131072, so RSS follows live memory): 3.77 GB at 64 MiB, 3.88 at 128, 4.26 at 256, 6.50 at 1 GiB; the plain path
# 11.44 GB. (With glibc's defaults, which keep freed blocks, fused peaks at 5.6-6.8 GB, varying by run; plain 13.6.)
# 128 MiB is 1,024 rows at a 32k vocab: matmuls still large enough for a GPU.
CHUNK_BYTES = 128 * 2**20


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _capped_tanh(x: torch.Tensor, weight: torch.Tensor, softcap: float) -> torch.Tensor:
    """tanh(logits / softcap) of a chunk in fp32 (logits = x @ weight.T in x's dtype); the logits are softcap times
    it. Computed in place in one fresh (rows, vocab) buffer."""
    return F.linear(x, weight).float().div_(softcap).tanh_()


def _chunk_gradient(t: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """d loss / d (x @ w.T) of a chunk, in place of `logits`: (softmax - one-hot) times each row's `scale` (its
    incoming gradient, 0 where ignored), through the softcap (1 - tanh^2, which squares `t` in place)."""
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    index = target.clamp(min=0).unsqueeze(1)
    grad.scatter_add_(1, index, torch.full(index.shape, -1.0, device=grad.device))
    grad.mul_(scale.unsqueeze(1))
    return grad.addcmul_(grad, t.square_(), value=-1.0)  # grad * (1 - t^2) in one pass


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row losses (N,) of softcap * tanh((x @ weight[:vocab_size].T) / softcap) against targets (N,), 0 where
    the target is IGNORE_INDEX. x (N, d) in the compute dtype; weight (V_pad, d), any float dtype (cast to x's).
    Backward recomputes each chunk's logits: each row's incoming gradient is known only then (RL's weighted
    rows). A scalar loss takes SummedSoftcapCrossEntropy, which needs no recomputation."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, softcap: float, chunk_rows: int):
        w = weight[:vocab_size].to(x.dtype)
        losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        lse = torch.empty_like(losses)
        for rows in _chunks(x.size(0), chunk_rows):
            logits = _capped_tanh(x[rows], w, softcap).mul_(softcap)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            target = targets[rows]
            picked = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            losses[rows] = torch.where(target != IGNORE_INDEX, lse[rows] - picked, 0.0)
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.vocab_size, ctx.softcap, ctx.chunk_rows = vocab_size, softcap, chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x, weight, targets, lse = ctx.saved_tensors
        V, softcap = ctx.vocab_size, ctx.softcap
        w = weight[:V].to(x.dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = None  # summed over the chunks in fp32, whatever the matmuls' dtype
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(x.size(0), ctx.chunk_rows):
            target, x_rows = targets[rows], x[rows]
            t = _capped_tanh(x_rows, w, softcap)
            scale = torch.where(target != IGNORE_INDEX, grad_losses[rows], 0.0)
            grad = _chunk_gradient(t, t * softcap, lse[rows], target, scale).to(x.dtype)
            if grad_x is not None:
                grad_x[rows] = grad @ w
            if grad_w is not None:
                grad_w[:V] += (grad.t() @ x_rows).float()
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


class SummedSoftcapCrossEntropy(torch.autograd.Function):
    """The sum of SoftcapCrossEntropy's per-row losses, with its gradients made in forward, chunk by chunk while the
    chunk's logits are at hand, for an incoming gradient of 1; backward only scales them by the real one (a scalar:
    the mean's 1/count, a loss scale). So the output layer costs 3 matmul units, as unfused, not 4; what is kept
    for backward is the gradients of x and of the weight, each the size of its tensor."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, softcap: float, chunk_rows: int):
        w = weight[:vocab_size].to(x.dtype)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = None  # summed over the chunks in fp32, whatever the matmuls' dtype
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(x.size(0), chunk_rows):
            target, x_rows = targets[rows], x[rows]
            valid = target != IGNORE_INDEX
            t = _capped_tanh(x_rows, w, softcap)
            logits = t * softcap
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            grad = _chunk_gradient(t, logits, lse, target, valid.float()).to(x.dtype)
            if grad_x is not None:
                grad_x[rows] = grad @ w
            if grad_w is not None:
                grad_w[:vocab_size] += (grad.t() @ x_rows).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_total.to(grad_x.dtype),
                None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype), None, None, None, None)


def _chunks(n: int, size: int):
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


# Eager even inside a compiled model (a graph break): traced, AOTAutograd's partitioner would merge backward's
# recomputed chunk logits with forward's and save them all, the whole logits again; and the chunk loop would pin a
# dynamic row count (RL's rollouts) to one value per compile.
@torch.compiler.disable
def softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          softcap: float, reduction: str = "mean", chunk_rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy(softcap * tanh(x @ weight[:vocab_size].T / softcap), targets, ignore_index=-1, reduction)
    without the full logits: x (N, d), targets (N,); "mean" over the targets that are not ignored, "sum", or
    "none" (per-row losses, 0 where ignored)."""
    chunk_rows = chunk_rows or rows_per_chunk(vocab_size)
    if reduction == "none":
        return SoftcapCrossEntropy.apply(x, weight, targets, vocab_size, softcap, chunk_rows)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if training:
        total = SummedSoftcapCrossEntropy.apply(x, weight, targets, vocab_size, softcap, chunk_rows)
    else:  # an evaluation: no gradients to make
        total = SoftcapCrossEntropy.apply(x, weight, targets, vocab_size, softcap, chunk_rows).sum()
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum()
