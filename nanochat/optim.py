"""One optimizer for the whole model: Muon for the 2-D block matrices, AdamW for everything else.

The same class serves one process and many. With a torch.distributed process group of more than one rank it
also does the gradient averaging (there is no DDP wrapper: every rank runs loss.backward() and then
optimizer.step()), ZeRO-2 style:

* Muon groups (all matrices of one shape): the K gradients are stacked and padded with zero matrices to
  k * world_size (k = ceil(K / world_size)); rank r receives the averaged gradients of matrices
  [r*k, (r+1)*k), updates those (it alone holds their momentum and NorMuon buffers), and the updated stack is
  all-gathered back into every rank's parameters. Zero padding matrices stay zero and are dropped.
* AdamW parameters with at least `small_numel` elements (embeddings, lm_head): the flattened gradient is
  split into world_size equal chunks (the last one padded when the size does not divide), rank r averages
  and updates chunk r with its own exp_avg / exp_avg_sq, then the chunks are all-gathered.
* Smaller AdamW parameters (the per-layer scalars): the gradient is all-reduced and every rank updates the
  whole tensor (their state is replicated; it is tiny).

Collectives are launched asynchronously in three phases as upstream does: every reduction first, then per
group wait -> update -> launch its gather, then wait for the gathers. NCCL uses reduce-scatter; other
backends (gloo) default to all-reduce followed by slicing, which every backend supports.

The numerics (nanochat.optim_updates) follow upstream nanochat's nanochat/optim.py (karpathy/nanochat, the
version with MuonEq and Muon+): Nesterov momentum, MuonEq row equilibration, Polar Express orthogonalisation,
Muon+ Frobenius renormalisation, NorMuon variance reduction, cautious weight decay, and the shape-based
learning-rate factor sqrt(max(1, rows/cols)). AdamW is decoupled AdamW with bias correction, computed in fp32
whatever the storage dtype; on the CPU, uncompiled, a step equals upstream's bit for bit (BENCHMARKS.md, issue 17).
build_optimizer() reproduces upstream GPT.setup_optimizer's groups, learning-rate scales, betas and weight
decays; upstream base_train.py's schedules (learning rate, Muon momentum and weight decay) are nanochat.schedules.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.optim_updates import (adamw_tensor_update_, adamw_update_, default_orth_dtype, fused_adamw_supported,
                                    muon_lr_factor, muon_update_)

# AdamW tensors below this many elements are all-reduced and updated whole on every rank (upstream: 1024).
SMALL_NUMEL = 1024

# ------------------------------------------------------------------------------------------------------------
# Collective helpers (the *_single names replace *_tensor in recent torch; older versions only have the latter)

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


class _Done:
    """Stands in for a collective's work handle when there was nothing to communicate."""

    def wait(self):
        return True


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW in one torch.optim.Optimizer, for one rank or a process group (see the module docstring).

    param_groups: dicts with 'params' and 'kind':
        kind='adamw': 'lr', 'betas' (default (0.8, 0.95)), 'eps' (1e-10), 'weight_decay' (0.0)
        kind='muon' : 'lr', 'momentum' (0.95), 'ns_steps' (5), 'beta2' (0.9), 'weight_decay' (0.0);
                      every parameter of a Muon group must have the same shape (>= 2-D), dtype and device.
    Any other keys (e.g. 'name') are kept. 'initial_lr' is set to 'lr' when absent, so a trainer can apply
    group['lr'] = group['initial_lr'] * multiplier. A Muon group's effective learning rate is
    lr * sqrt(max(1, rows/cols)), applied inside step().

    process_group: the group to reduce over (default: the world group, when torch.distributed is initialised).
    small_numel: AdamW tensors smaller than this are all-reduced and updated whole on every rank.
    orth_dtype: dtype of the Polar Express iterations (default: bf16 where the compute dtype is bf16, else fp32).
    compile: torch.compile the Muon and the unfused AdamW updates (default: when the Muon parameters are on CUDA;
             compile_updates() turns it on later).
    fused: use torch's fused AdamW kernel (default: when the group's parameters are all on CUDA).
    reduce_scatter: use reduce-scatter for gradients (default: on NCCL); otherwise all-reduce and slice.

    A parameter whose .grad is None is treated as having a zero gradient (every rank must take part in every
    collective, so this is the only choice that behaves the same for one rank and many).
    owned_state() names each piece of state this rank holds by parameter and offset, which is what a checkpoint
    keeps (nanochat.optim_state) so that any number of ranks can load it. torch's state_dict() holds this rank's
    shard and records the layout (world size, rank, small_numel); load_state_dict() refuses a state saved with a
    different layout (checkpoints written before the per-parameter format).
    """

    def __init__(self, param_groups: Iterable[dict], *, process_group=None, small_numel: int = SMALL_NUMEL,
                 orth_dtype: torch.dtype | None = None, compile: bool | None = None, fused: bool | None = None,
                 reduce_scatter: bool | None = None):
        param_groups = list(param_groups)  # the dicts themselves become self.param_groups, as in torch
        for g in param_groups:
            kind = g.get("kind")
            if kind == "adamw":
                g.setdefault("betas", (0.8, 0.95))
                g.setdefault("eps", 1e-10)
                g.setdefault("weight_decay", 0.0)
            elif kind == "muon":
                g.setdefault("momentum", 0.95)
                g.setdefault("ns_steps", 5)
                g.setdefault("beta2", 0.9)
                g.setdefault("weight_decay", 0.0)
            else:
                raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")
            if "lr" not in g:
                raise ValueError(f"param group {g.get('name', kind)!r} has no 'lr'")
        super().__init__(param_groups, defaults={})

        if dist.is_available() and dist.is_initialized():
            self.process_group = process_group
            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
            backend = str(dist.get_backend(process_group)).lower()
        else:
            self.process_group, self.rank, self.world_size, backend = None, 0, 1, "none"
        self.small_numel = int(small_numel)
        self.reduce_scatter = ("nccl" in backend) if reduce_scatter is None else bool(reduce_scatter)

        muon_device = None
        for g in self.param_groups:
            g.setdefault("initial_lr", g["lr"])
            params = g["params"]
            if g["kind"] == "muon":
                if any(p.ndim < 2 for p in params):
                    raise ValueError("Muon parameters must be at least 2-D")
                if len({(tuple(p.shape), p.dtype, p.device) for p in params}) > 1:
                    raise ValueError(f"Muon group {g.get('name', '')!r} mixes shapes/dtypes/devices; "
                                     "make one group per shape")
                if params:
                    muon_device = params[0].device
            else:
                if fused is None:
                    g["fused"] = fused_adamw_supported(params)
                else:
                    g["fused"] = bool(fused)
                for p in params:
                    if p.numel() >= self.small_numel and self.world_size > 1 and not p.is_contiguous():
                        raise ValueError("sharded AdamW parameters must be contiguous")
        if orth_dtype is None:
            orth_dtype = default_orth_dtype(muon_device) if muon_device is not None else torch.float32
        self.orth_dtype = orth_dtype
        if compile is None:
            compile = muon_device is not None and muon_device.type == "cuda"
        # Muon's hyperparameters as 0-D float32 tensors, refilled every step (muon_update_): eager, on its device;
        # compiled, on the CPU as upstream's (compile_updates), so that a new value triggers no recompilation
        self._hp = {k: torch.zeros((), dtype=torch.float32, device=muon_device or "cpu")
                    for k in ("momentum", "lr", "wd", "beta2")}
        self._muon_fn, self._adamw_fn = muon_update_, adamw_tensor_update_
        if compile:
            self.compile_updates()

    def compile_updates(self) -> None:
        """torch.compile the Muon update and the unfused AdamW update from now on, as upstream compiles its steps:
        each becomes a few fused kernels instead of a pass through memory per op. Their results can differ from
        eager's in the last bits, so a run compiles them from its first step or never (the training stages: with
        the model, the `compile` key)."""
        self._hp = {k: v.cpu() for k, v in self._hp.items()}
        # not fullgraph=True: past dynamo's recompile limit (8 shapes a process, which a process building several
        # models reaches) that is an error, where without it the new shapes run eager
        self._muon_fn = torch.compile(muon_update_, dynamic=False)
        self._adamw_fn = torch.compile(adamw_tensor_update_, dynamic=False)

    # -- layout -------------------------------------------------------------------------------------------------

    def _is_sharded(self, p: Tensor) -> bool:
        return self.world_size > 1 and p.numel() >= self.small_numel

    def _flat_range(self, p: Tensor) -> tuple[int, int, int]:
        """(chunk, lo, hi): this rank's slice [lo, hi) of p.view(-1), chunk = ceil(numel / world_size)."""
        n, W, r = p.numel(), self.world_size, self.rank
        chunk = -(-n // W)
        return chunk, min(r * chunk, n), min((r + 1) * chunk, n)

    def _muon_range(self, K: int) -> tuple[int, int, int]:
        """(k, start, owned): this rank owns matrices [start, start+owned) of a K-matrix group."""
        k = -(-K // self.world_size)
        start = self.rank * k
        return k, start, max(0, min(k, K - start))

    def _adamw_part(self, p: Tensor) -> Tensor:
        """The part of an AdamW parameter this rank updates: all of it, or its flat slice when sharded."""
        if not self._is_sharded(p):
            return p
        _, lo, hi = self._flat_range(p)
        return p.view(-1)[lo:hi]

    def _adamw_state(self, p: Tensor, fused: bool) -> dict:
        state = self.state[p]
        if not state:
            part = self._adamw_part(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            state["exp_avg"] = torch.zeros_like(part)
            state["exp_avg_sq"] = torch.zeros_like(part)
        return state

    def _muon_state(self, group: dict) -> dict:
        """A Muon group's buffers for this rank's k matrices; they live under the group's first parameter, as
        upstream's."""
        p0 = group["params"][0]
        state = self.state[p0]
        if "momentum_buffer" not in state:
            k, _, _ = self._muon_range(len(group["params"]))
            shape, dtype, device = p0.shape, p0.dtype, p0.device
            state["momentum_buffer"] = torch.zeros(k, *shape, dtype=dtype, device=device)
            if shape[-2] >= shape[-1]:
                second = (k, *shape[:-1], 1)
            else:
                second = (k, *shape[:-2], 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(second, dtype=dtype, device=device)
        return state

    def owned_state(self, create: bool = False):
        """(param, key, full_shape, offset, flat) for each piece of state this rank holds, whatever the world size:
        `flat` is a writable 1-D view of the elements [offset, offset + len) of the parameter's whole `key` state
        (row-major), whose shape is full_shape: the parameter's (exp_avg, exp_avg_sq, momentum_buffer), one per
        row or column (second_momentum_buffer), or () (step). Sharded AdamW parameters give this rank's slice;
        replicated ones and Muon matrices come whole, each Muon matrix from the one rank that updates it.
        create=True first makes the zero state a first step would (for a load to fill); otherwise parameters
        without state yet are left out."""
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "adamw":
                for p in params:
                    if not (create or self.state.get(p)):  # .get: no empty entry in the defaultdict
                        continue
                    state = self._adamw_state(p, group.get("fused", False))
                    offset = self._flat_range(p)[1] if self._is_sharded(p) else 0
                    yield p, "step", (), 0, state["step"].view(1)
                    for key in ("exp_avg", "exp_avg_sq"):
                        yield p, key, tuple(p.shape), offset, state[key].view(-1)
            elif params and (create or "momentum_buffer" in self.state.get(params[0], {})):
                state = self._muon_state(group)
                _, start, owned = self._muon_range(len(params))
                for i in range(owned):
                    for key in ("momentum_buffer", "second_momentum_buffer"):
                        yield params[start + i], key, tuple(state[key][i].shape), 0, state[key][i].view(-1)

    # -- checkpointing ------------------------------------------------------------------------------------------

    def _layout(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "small_numel": self.small_numel}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["shard_layout"] = self._layout()
        sd["world_size"] = self.world_size
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("shard_layout")
        if saved != self._layout():
            raise ValueError(f"optimizer state was saved with layout {saved} but this optimizer has {self._layout()}; "
                             "its sharded state can only be restored at the same world size, rank and small_numel "
                             "(model weights are unaffected)")
        state_dict = {k: v for k, v in state_dict.items() if k not in ("shard_layout", "world_size")}
        super().load_state_dict(state_dict)

    # -- the step -----------------------------------------------------------------------------------------------

    def _grad(self, p: Tensor) -> Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def _reduce_adamw(self, group: dict) -> list:
        infos = []
        W, pg = self.world_size, self.process_group
        for p in group["params"]:
            g = self._grad(p)
            if W == 1:
                infos.append(dict(work=_Done(), grad=g, kind="full"))
            elif not self._is_sharded(p):
                if p.grad is None:
                    p.grad = g
                infos.append(dict(work=dist.all_reduce(p.grad, group=pg, async_op=True), grad=p.grad, kind="full"))
            elif self.reduce_scatter:
                chunk, lo, hi = self._flat_range(p)
                flat = g.reshape(-1)
                if chunk * W != flat.numel():
                    padded = torch.zeros(chunk * W, dtype=flat.dtype, device=flat.device)
                    padded[:flat.numel()].copy_(flat)
                    flat = padded
                out = torch.empty(chunk, dtype=flat.dtype, device=flat.device)
                work = _reduce_scatter(out, flat, op=dist.ReduceOp.SUM, group=pg, async_op=True)
                infos.append(dict(work=work, grad=out[:hi - lo], kind="shard"))
            else:
                if p.grad is None:
                    p.grad = g
                chunk, lo, hi = self._flat_range(p)
                work = dist.all_reduce(p.grad, group=pg, async_op=True)
                infos.append(dict(work=work, grad=p.grad, kind="shard_of_full"))
        return infos

    def _compute_adamw(self, group: dict, infos: list, gathers: list) -> None:
        W = self.world_size
        fused = group.get("fused", False)
        ps, gs, ms, vs, steps = [], [], [], [], []
        sends = []
        for p, info in zip(group["params"], infos):
            info["work"].wait()
            g = info["grad"]
            if W > 1:
                g.mul_(1.0 / W)  # the reductions sum; average here, identically on every backend
            p_part = self._adamw_part(p)
            if info["kind"] != "full":
                chunk, lo, hi = self._flat_range(p)
                if info["kind"] == "shard_of_full":
                    g = g.reshape(-1)[lo:hi]
                sends.append((p, chunk, lo, hi))
            state = self._adamw_state(p, fused)
            ps.append(p_part)
            gs.append(g.to(p_part.dtype) if g.dtype != p_part.dtype else g)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw_update_(ps, gs, ms, vs, steps, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], fused=fused, update=self._adamw_fn)
        for p, chunk, lo, hi in sends:
            flat = p.view(-1)
            send = torch.zeros(chunk, dtype=p.dtype, device=p.device)
            send[:hi - lo].copy_(flat[lo:hi])
            if chunk * W == flat.numel():
                work = _all_gather(flat, send, group=self.process_group, async_op=True)
                gathers.append(dict(work=work))
            else:
                out = torch.empty(chunk * W, dtype=p.dtype, device=p.device)
                work = _all_gather(out, send, group=self.process_group, async_op=True)
                gathers.append(dict(work=work, copy=(flat, out[:flat.numel()])))

    def _reduce_muon(self, group: dict) -> dict | None:
        params = group["params"]
        if not params:
            return None
        W, K = self.world_size, len(params)
        k, start, owned = self._muon_range(K)
        shape, dtype, device = params[0].shape, params[0].dtype, params[0].device
        stacked = torch.zeros(k * W, *shape, dtype=dtype, device=device)
        torch._foreach_copy_(list(stacked[:K].unbind(0)), [self._grad(p) for p in params])
        if W == 1:
            return dict(work=_Done(), chunk=stacked, stacked=stacked)
        if self.reduce_scatter:
            chunk = torch.empty(k, *shape, dtype=dtype, device=device)
            work = _reduce_scatter(chunk, stacked, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)
        else:
            work = dist.all_reduce(stacked, group=self.process_group, async_op=True)
            chunk = stacked[start:start + k]
        return dict(work=work, chunk=chunk, stacked=stacked)

    def _compute_muon(self, group: dict, info: dict | None, gathers: list) -> None:
        if info is None:
            return
        params = group["params"]
        W, K = self.world_size, len(params)
        k, start, owned = self._muon_range(K)
        p0 = params[0]
        shape, dtype, device = p0.shape, p0.dtype, p0.device
        state = self._muon_state(group)
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        info["work"].wait()
        chunk = info["chunk"]
        if owned > 0:
            grads = chunk[:owned]
            if W > 1:
                grads.mul_(1.0 / W)
            stacked_params = torch.stack([p.detach() for p in params[start:start + owned]])
            momentum = group["momentum"]
            beta2 = group["beta2"] if group["beta2"] is not None else 0.0
            lr = group["lr"] * muon_lr_factor(shape)
            wd = group["weight_decay"]
            hp = self._hp
            hp["momentum"].fill_(momentum)
            hp["lr"].fill_(lr)
            hp["wd"].fill_(wd)
            hp["beta2"].fill_(beta2)
            momentum, lr, wd, beta2 = hp["momentum"], hp["lr"], hp["wd"], hp["beta2"]
            self._muon_fn(grads, stacked_params, state["momentum_buffer"][:owned],
                          state["second_momentum_buffer"][:owned], momentum, lr, wd, beta2,
                          int(group["ns_steps"]), red_dim, self.orth_dtype)
        else:
            stacked_params = None
        if W == 1:
            torch._foreach_copy_(params, list(stacked_params.unbind(0)))
            return
        send = torch.zeros(k, *shape, dtype=dtype, device=device)
        if owned > 0:
            send[:owned].copy_(stacked_params)
        stacked = info["stacked"]  # the reduction buffer is free again: gather the updated matrices into it
        work = _all_gather(stacked, send, group=self.process_group, async_op=True)
        gathers.append(dict(work=work, muon=(params, stacked)))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Phase 1: launch every reduction
        reduced = []
        for group in self.param_groups:
            if group["kind"] == "muon":
                reduced.append(self._reduce_muon(group))
            else:
                reduced.append(self._reduce_adamw(group))
        # Phase 2: per group, wait for its reduction, update this rank's share, launch its gather
        gathers: list[dict] = []
        for group, info in zip(self.param_groups, reduced):
            if group["kind"] == "muon":
                self._compute_muon(group, info, gathers)
            else:
                self._compute_adamw(group, info, gathers)
        # Phase 3: wait for the gathers and copy out of any staging buffers
        for gather in gathers:
            gather["work"].wait()
            if "copy" in gather:
                dst, src = gather["copy"]
                dst.copy_(src)
            if "muon" in gather:
                params, stacked = gather["muon"]
                torch._foreach_copy_(params, list(stacked[:len(params)].unbind(0)))
        return loss


# ------------------------------------------------------------------------------------------------------------
# Upstream's parameter groups (GPT.setup_optimizer)

GROUP_KEYS = ("matrix", "embedding", "lm_head", "value_embeds", "resid_lambdas", "x0_lambdas", "smear", "router",
              "scalars")
_ALIASES = {"wte": "embedding", "unembedding": "lm_head", "resid": "resid_lambdas", "x0": "x0_lambdas"}


def build_optimizer(groups: Mapping[str, Iterable[torch.nn.Parameter]], *, d_model: int,
                    unembedding_lr: float, embedding_lr: float, matrix_lr: float, scalar_lr: float,
                    weight_decay: float = 0.0, router_lr: float = 0.005,
                    smear_lr: float = 0.2, adam_betas: tuple[float, float] | None = None,
                    **optimizer_kwargs) -> MuonAdamW:
    """Upstream GPT.setup_optimizer's groups from a {name: [params]} dict (model.param_groups()).

    With s = (d_model / 768) ** -0.5 (the AdamW LRs were tuned at width 768):
      lm_head        AdamW lr = unembedding_lr * s        betas (0.8, 0.96)   wd 0.01
      embedding      AdamW lr = embedding_lr * s          betas (0.8, 0.995)  wd 0.001   ('wte' accepted)
      value_embeds   AdamW lr = embedding_lr * s * 0.5    betas (0.8, 0.995)  wd 0.01
      resid_lambdas  AdamW lr = scalar_lr * 0.01          betas (0.8, 0.95)   wd 0.05    ('resid' accepted)
      x0_lambdas     AdamW lr = scalar_lr                 betas (0.96, 0.95)  wd 0.0     ('x0' accepted)
      smear          AdamW lr = smear_lr (0.2, unscaled)  betas (0.8, 0.95)   wd 0.0   (smear gate/lambda, backout)
      router         AdamW lr = router_lr * s             betas (0.8, 0.96)   wd 0.0   (MoE gates)
      scalars        AdamW lr = scalar_lr                 betas (0.8, 0.95)   wd 0.0   (any other scalars; not upstream)
      matrix         Muon, one group per shape (sorted), lr = matrix_lr, momentum 0.95, ns_steps 5,
                     beta2 0.9, wd = weight_decay; step() multiplies lr by sqrt(max(1, rows/cols)).
    adam_betas, when given, replaces the betas of every AdamW group except x0_lambdas (older upstream's knob).
    Every group gets 'name' and 'initial_lr'. Missing or empty keys are skipped; unknown keys are an error.
    """
    named: dict[str, list] = {}
    for key, params in groups.items():
        name = _ALIASES.get(key, key)
        if name not in GROUP_KEYS:
            raise ValueError(f"unknown parameter group {key!r}; valid: {', '.join(GROUP_KEYS)}")
        if name in named:
            raise ValueError(f"parameter group {name!r} given twice")
        named[name] = [p for p in params]
    s = (d_model / 768) ** -0.5

    def betas(default):
        return tuple(adam_betas) if adam_betas is not None else default

    adamw_specs = [
        ("lm_head", unembedding_lr * s, betas((0.8, 0.96)), 0.01),
        ("embedding", embedding_lr * s, betas((0.8, 0.995)), 0.001),
        ("value_embeds", embedding_lr * s * 0.5, betas((0.8, 0.995)), 0.01),
        ("resid_lambdas", scalar_lr * 0.01, betas((0.8, 0.95)), 0.05),
        ("x0_lambdas", scalar_lr, (0.96, 0.95), 0.0),
        ("smear", smear_lr, betas((0.8, 0.95)), 0.0),
        ("router", router_lr * s, betas((0.8, 0.96)), 0.0),
        ("scalars", scalar_lr, betas((0.8, 0.95)), 0.0),
    ]
    param_groups = []
    for name, lr, group_betas, wd in adamw_specs:
        if named.get(name):
            param_groups.append(dict(kind="adamw", name=name, params=named[name], lr=lr, betas=group_betas,
                                     eps=1e-10, weight_decay=wd))
    matrix = named.get("matrix", [])
    for shape in sorted({tuple(p.shape) for p in matrix}):
        param_groups.append(dict(kind="muon", name="matrix_" + "x".join(map(str, shape)),
                                 params=[p for p in matrix if tuple(p.shape) == shape], lr=matrix_lr,
                                 momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
    return MuonAdamW(param_groups, **optimizer_kwargs)
