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


# On a CPU the elementwise work between the matmuls runs on pieces of at most this many fp32 bytes: glibc serves
# blocks under its mmap threshold (at most 32 MiB) from memory it reuses, while a larger block is a fresh mapping
# whose every page faults when first written: one pass over 128 MiB of fp32 took 48 ms into a fresh block and 12 ms
# into a reused one (Xeon, 2 cores), so pieces of 128 rows at a 32k vocab ran the chunk's elementwise work 2.5x
# faster (69 vs 175 ms per 1,024 rows, bf16 logits). GPU memory comes from torch's caching allocator: no pieces.
CPU_PIECE_BYTES = 16 * 2**20


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def rows_per_piece(vocab_size: int, device: torch.device) -> int | None:
    return max(1, CPU_PIECE_BYTES // (4 * vocab_size)) if device.type == "cpu" else None


def chunk_losses(logits: torch.Tensor, target: torch.Tensor, softcap: float) -> torch.Tensor:
    """Per-row losses of a chunk from its raw logits (x @ w.T, in x's dtype): the log-sum-exp of the capped logits
    softcap * tanh(logits / softcap) minus the target's, 0 where the target is ignored. The capped logits lie
    within +-softcap, so their exp cannot overflow fp32 (below ~88): no max is subtracted first, which saves
    torch.logsumexp's extra passes over the chunk (each one a pass through memory on a CPU)."""
    t, _, sums = _capped_exp(logits, softcap)
    return _losses(t, sums, target, softcap)


def chunk_losses_and_gradient_(logits: torch.Tensor, target: torch.Tensor, softcap: float) -> torch.Tensor:
    """chunk_losses, with d loss / d logits of each row for an incoming gradient of 1 written over `logits`:
    softmax minus one-hot through the softcap (1 - tanh^2). Ignored rows get a meaningless row: the callers scale
    rows by 0 or by their incoming gradient on the (rows, d) side of the matmuls, not on the (rows, vocab) side."""
    t, exps, sums = _capped_exp(logits, softcap)
    losses = _losses(t, sums, target, softcap)
    index = target.clamp(min=0).unsqueeze(1)
    if torch.compiler.is_compiling():  # a graph without mutation, which inductor fuses into one kernel
        one_hot = torch.arange(logits.size(1), device=logits.device) == index
        grad = (exps / sums.unsqueeze(1) - one_hot.float()) * (1 - t * t)
    else:  # eager: every step in place, one pass each and no fresh (rows, vocab) block
        grad = exps.div_(sums.unsqueeze(1))
        grad.scatter_add_(1, index, torch.full(index.shape, -1.0, device=grad.device))
        grad.addcmul_(grad, t.square_(), value=-1.0)
    logits.copy_(grad)
    return losses


def _tanh(u: torch.Tensor) -> torch.Tensor:
    """tanh(u), in place when eager. Compiled for a CPU, as 2 / (1 + exp(-2u)) - 1: inductor's own CPU tanh ran 4.8x
    slower than torch's (5.3 vs 1.1 ms on 128 x 32,768 fp32, 2-core Xeon; inductor keeps its exp form off by default
    for its edge cases, pytorch#148241), the exp form as fast. Its absolute error (~1e-7) is all that matters here,
    where t only enters exp(softcap * t) and 1 - t^2: losses within 2e-6 of fp64, as with torch.tanh."""
    if not torch.compiler.is_compiling():
        return u.tanh_()
    return 2 / (1 + torch.exp(-2 * u)) - 1 if u.device.type == "cpu" else torch.tanh(u)


def _capped_exp(logits: torch.Tensor, softcap: float):
    """(t = tanh(logits / softcap) in fp32, exp(softcap * t), their row sums), in two fresh (rows, vocab) buffers;
    `logits` is left as it is."""
    t = _tanh(logits / softcap if logits.dtype == torch.float32 else logits.float().div_(softcap))
    exps = torch.mul(t, softcap).exp_()
    return t, exps, exps.sum(dim=1)


def _losses(t, sums, target, softcap: float) -> torch.Tensor:
    picked = t.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1).mul_(softcap)
    return torch.where(target != IGNORE_INDEX, sums.log() - picked, 0.0)


def _chunk_gradients(x, w, targets, chunk_rows: int, softcap: float, math, gradient: bool):
    """For each chunk of rows: (its rows, its losses, and when `gradient` d loss / d logits for an incoming
    gradient of 1, in x's dtype). Every chunk's logits go into one buffer made once, and the gradient over them in
    place; the elementwise work in between runs piece by piece (rows_per_piece)."""
    n, piece = x.size(0), rows_per_piece(w.size(0), x.device) or chunk_rows
    buffer = torch.empty(min(chunk_rows, n), w.size(0), dtype=x.dtype, device=x.device)
    for rows in _chunks(n, chunk_rows):
        logits = torch.mm(x[rows], w.t(), out=buffer[:rows.stop - rows.start])
        losses = torch.empty(logits.size(0), dtype=torch.float32, device=x.device)
        target = targets[rows]
        for part in _chunks(logits.size(0), piece):
            if gradient:
                losses[part] = math.losses_and_gradient_(logits[part], target[part], softcap)
            else:
                losses[part] = math.losses(logits[part], target[part], softcap)
        yield rows, losses, logits


def _add_weight_gradient(grad_w: torch.Tensor, grad: torch.Tensor, x_rows: torch.Tensor) -> None:
    """grad_w (fp32) += grad.T @ x_rows: in place where the matmul's dtype is fp32 already (no fresh V x d block)."""
    if grad.dtype == torch.float32:
        grad_w.addmm_(grad.t(), x_rows)
    else:
        grad_w += (grad.t() @ x_rows).float()


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row losses (N,) of softcap * tanh((x @ weight[:vocab_size].T) / softcap) against targets (N,), 0 where
    the target is IGNORE_INDEX. x (N, d) in the compute dtype; weight (V_pad, d), any float dtype (cast to x's).
    Backward recomputes each chunk's logits: each row's incoming gradient is known only then (RL's weighted
    rows). A scalar loss takes SummedSoftcapCrossEntropy, which needs no recomputation. `math`: ChunkMath."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, softcap: float, chunk_rows: int, math):
        w = weight[:vocab_size].to(x.dtype)
        losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        for rows, chunk, _ in _chunk_gradients(x, w, targets, chunk_rows, softcap, math, gradient=False):
            losses[rows] = chunk
        ctx.save_for_backward(x, weight, targets)
        ctx.vocab_size, ctx.softcap, ctx.chunk_rows, ctx.math = vocab_size, softcap, chunk_rows, math
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x, weight, targets = ctx.saved_tensors
        V = ctx.vocab_size
        w = weight[:V].to(x.dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = None  # summed over the chunks in fp32, whatever the matmuls' dtype
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows, _, grad in _chunk_gradients(x, w, targets, ctx.chunk_rows, ctx.softcap, ctx.math, gradient=True):
            scale = torch.where(targets[rows] != IGNORE_INDEX, grad_losses[rows], 0.0).unsqueeze(1)
            if grad_x is not None:
                grad_x[rows] = (grad @ w).mul_(scale)
            if grad_w is not None:
                _add_weight_gradient(grad_w[:V], grad, (x[rows] * scale).to(x.dtype))
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


class SummedSoftcapCrossEntropy(torch.autograd.Function):
    """The sum of SoftcapCrossEntropy's per-row losses, with its gradients made in forward, chunk by chunk while the
    chunk's logits are at hand, for an incoming gradient of 1; backward only scales them by the real one (a scalar:
    the mean's 1/count, a loss scale). So the output layer costs 3 matmul units, as unfused, not 4; what is kept
    for backward is the gradients of x and of the weight, each the size of its tensor."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, softcap: float, chunk_rows: int, math):
        w = weight[:vocab_size].to(x.dtype)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = None  # summed over the chunks in fp32, whatever the matmuls' dtype
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows, losses, grad in _chunk_gradients(x, w, targets, chunk_rows, softcap, math, gradient=True):
            total += losses.sum()
            valid = (targets[rows] != IGNORE_INDEX).unsqueeze(1)
            if grad_x is not None:
                grad_x[rows] = (grad @ w).mul_(valid)
            if grad_w is not None:
                _add_weight_gradient(grad_w[:vocab_size], grad, x[rows] * valid)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else (grad_x.float() * grad_total).to(grad_x.dtype),  # 1/count kept in fp32
                None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype), None, None, None, None, None)


class ChunkMath:
    """What happens to a chunk's logits between the matmuls: eager, or torch.compile'd where the model is (the
    fused loss runs outside its graph). Compiled, a piece's gradient is one kernel: 11.7 against 23.4 ms eager
    per 128 x 32,768 bf16 logits (2-core Xeon, median of 10, alternating); on a GPU it is not measured yet."""

    def __init__(self, compiled: bool):
        wrap = torch.compile if compiled else (lambda fn: fn)
        self.losses, self.losses_and_gradient_ = wrap(chunk_losses), wrap(chunk_losses_and_gradient_)


EAGER, COMPILED = ChunkMath(False), ChunkMath(True)


def _chunks(n: int, size: int):
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


# Eager even inside a compiled model (a graph break): traced, AOTAutograd's partitioner would merge backward's
# recomputed chunk logits with forward's and save them all, the whole logits again; and the chunk loop would pin a
# dynamic row count (RL's rollouts) to one value per compile.
@torch.compiler.disable
def softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          softcap: float, reduction: str = "mean", chunk_rows: int | None = None,
                          compiled: bool = False) -> torch.Tensor:
    """F.cross_entropy(softcap * tanh(x @ weight[:vocab_size].T / softcap), targets, ignore_index=-1, reduction)
    without the full logits: x (N, d), targets (N,); "mean" over the targets that are not ignored, "sum", or
    "none" (per-row losses, 0 where ignored). `compiled`: the chunks' elementwise work torch.compile'd (ChunkMath),
    as for a compiled model."""
    args = (x, weight, targets, vocab_size, softcap, chunk_rows or rows_per_chunk(vocab_size),
            COMPILED if compiled else EAGER)
    if reduction == "none":
        return SoftcapCrossEntropy.apply(*args)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if training:
        total = SummedSoftcapCrossEntropy.apply(*args)
    else:  # an evaluation: no gradients to make
        total = SoftcapCrossEntropy.apply(*args).sum()
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum()
