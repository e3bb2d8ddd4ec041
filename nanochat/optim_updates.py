"""The per-tensor arithmetic of MuonAdamW (nanochat.optim): Muon's steps on a stack of same-shape matrices and
AdamW's on one tensor, each a pure function that updates its arguments in place, so that one rank or many, eager
or torch.compile'd, run the same code. The numerics follow upstream nanochat's nanochat/optim.py op for op."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _torch_adamw

from nanochat.distributed import compute_dtype

# Polar Express coefficients (Amsel, Persson, Musco, Gower, arXiv:2505.16932), the set computed for five
# iterations with safety factor 2e-2 and cushion 2, as used upstream.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# ------------------------------------------------------------------------------------------------------------
# Muon building blocks (each works on a stack (..., rows, cols) of matrices)

def row_equilibrate(X: Tensor) -> Tensor:
    """MuonEq: scale every row to the mean row norm, ||X||_F / sqrt(rows), before orthogonalising."""
    Xf = X.float()
    target = Xf.norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    row_norm = Xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return X * (target / row_norm).to(X.dtype)


def polar_express(X: Tensor, ns_steps: int = 5) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of X = U S V^T with Polar Express iterations.

    X is first scaled to Frobenius norm just under 1 (so every singular value is in (0, 1)); each step applies
    the odd polynomial p(X) = a X + b (X X^T) X + c (X X^T)^2 X, computed on the smaller Gram matrix."""
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def renormalize(X: Tensor) -> Tensor:
    """Muon+: set the Frobenius norm to sqrt(min(rows, cols)), that of an exactly semi-orthogonal matrix."""
    target = min(X.size(-2), X.size(-1)) ** 0.5
    current = X.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return X * (target / current).to(X.dtype)


def normuon_scale(g: Tensor, second_moment: Tensor, beta2, red_dim: int) -> Tensor:
    """NorMuon: divide every row (red_dim=-1) or column (red_dim=-2) by the root of an EMA of its mean square,
    then rescale so the update keeps its Frobenius norm. Updates `second_moment` in place."""
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    n = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(v_mean.to(second_moment.dtype), 1 - beta2)
    step = second_moment.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * n) * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    scale = step * (v_norm / v_norm_new.clamp_min(1e-10))
    return g * scale.to(g.dtype)


def muon_update_(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_moment: Tensor,
                 momentum, lr, weight_decay, beta2, ns_steps: int, red_dim: int,
                 orth_dtype: torch.dtype) -> None:
    """One Muon step on a stack of same-shape matrices, in place on `params` and the two buffers.
    `grads` is used as scratch. The hyperparameters are 0-D float32 tensors, as upstream's: what is computed
    from them (1 - momentum, lr * weight_decay) is rounded to fp32 as upstream rounds it."""
    # Nesterov momentum: buf <- m*buf + (1-m)*g ; direction = (1-m)*g + m*buf
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    X = row_equilibrate(g.to(orth_dtype))
    X = polar_express(X, ns_steps)
    g = renormalize(X.to(params.dtype))
    g = normuon_scale(g, second_moment, beta2, red_dim)
    # Cautious weight decay: decay only the entries where the update and the parameter share a sign
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * weight_decay * params * mask)


def muon_lr_factor(shape) -> float:
    """Upstream's shape-based factor on the Muon learning rate: sqrt(max(1, rows / cols))."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


def default_orth_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the model computes in bf16 (CUDA SM >= 80, a CPU with native bf16), fp32 otherwise: upstream's rule
    (its Polar Express runs in COMPUTE_DTYPE when that is bf16). On the 2-core Xeon (AMX) the d6 Muon step's
    batched matmuls took 63 ms in bf16 against 348 ms in fp32."""
    return torch.bfloat16 if compute_dtype(device.type)[0] == torch.bfloat16 else torch.float32


# ------------------------------------------------------------------------------------------------------------
# AdamW

def adamw_update_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, fused: bool = False, update=None) -> None:
    """Decoupled AdamW with bias correction, in place. `steps` are 0-D float32 tensors, incremented here.

    fused=True hands the lists to torch's fused kernel (one launch; steps must live on the params' device);
    otherwise `update` (adamw_tensor_update_, or its torch.compile'd self) runs on each tensor in turn."""
    if not params:
        return
    if fused:
        _torch_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False, fused=True, amsgrad=False,
                     beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
        return
    hyper = [torch.tensor(x, dtype=torch.float32, device=params[0].device)
             for x in (lr, beta1, beta2, eps, weight_decay)]
    for tensors in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        tensors[-1].add_(1)  # here, not in the compiled update: the step count lives on the CPU
        (update or adamw_tensor_update_)(*tensors, *hyper)


def adamw_tensor_update_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: Tensor, beta1: Tensor,
                         beta2: Tensor, eps: Tensor, wd: Tensor) -> None:
    """One tensor's AdamW step, the `step`th: upstream's adamw_step_fused op for op, the hyperparameters 0-D float32
    tensors (so rounded where upstream rounds them, and compiled once for all their values), computed in fp32 and
    written back in the storage dtype."""
    p32, g32, m32, v32 = p.float(), g.float(), m.float(), v.float()
    p32.mul_(1 - lr * wd)
    m32.lerp_(g32, 1 - beta1)
    v32.lerp_(g32.square(), 1 - beta2)
    denom = (v32 / (1 - beta2 ** step)).sqrt() + eps
    p32.add_(m32 / denom, alpha=-(lr / (1 - beta1 ** step)))
    for dst, src in ((p, p32), (m, m32), (v, v32)):
        if dst is not src:
            dst.copy_(src)


def fused_adamw_supported(params: list[Tensor]) -> bool:
    return bool(params) and all(p.device.type == "cuda" and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                for p in params)
