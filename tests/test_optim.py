"""MuonAdamW against a plain reference, Polar Express, cautious weight decay, and 2-rank gloo == 1 rank."""

import datetime
import io
import math
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from nanochat.optim import MuonAdamW, build_optimizer
from nanochat.optim_updates import (adamw_tensor_update_, adamw_update_, polar_express, renormalize,
                                    row_equilibrate)
from nanochat.schedules import apply_schedule, lr_multiplier, muon_momentum, muon_weight_decay
from nanochat.stages.training import optimizer_step


# ------------------------------------------------------------------------------------------------------------
# The reference: one matrix / one tensor at a time, every formula written out

# Polar Express, five iterations, safety factor 2e-2, cushion 2 (arXiv:2505.16932; the table upstream uses)
PE_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

def ref_orthogonalize(u):
    """MuonEq -> Polar Express (always the X X^T form, whatever the aspect) -> Muon+, on one 2-D matrix."""
    rows, cols = u.shape
    mean_row_norm = u.norm() / math.sqrt(rows)
    X = u * (mean_row_norm / u.norm(dim=1, keepdim=True).clamp_min(1e-6))
    X = X / (X.norm() * 1.01 + 1e-6)
    for a, b, c in PE_COEFFS:
        G = X @ X.T
        X = a * X + b * (G @ X) + c * (G @ G @ X)
    return X * (math.sqrt(min(rows, cols)) / X.norm())


class RefMuon:
    def __init__(self, lr, momentum, beta2, wd):
        self.lr, self.momentum, self.beta2, self.wd = lr, momentum, beta2, wd
        self.buf, self.v = {}, {}
        # entries whose update is so close to 0 that float rounding decides the cautious mask's sign: the two
        # implementations may legitimately disagree there (by lr * wd * p), so the comparison leaves them out
        self.ambiguous = {}

    def step(self, i, p, g):
        rows, cols = p.shape
        m = self.momentum
        buf = self.buf.get(i, torch.zeros_like(p))
        buf = m * buf + (1 - m) * g
        self.buf[i] = buf
        u = (1 - m) * g + m * buf  # Nesterov
        u = ref_orthogonalize(u)
        # NorMuon: per row (rows >= cols) or per column mean square, EMA, normalise, keep the Frobenius norm
        v_now = (u ** 2).mean(dim=1, keepdim=True) if rows >= cols else (u ** 2).mean(dim=0, keepdim=True)
        v = self.beta2 * self.v.get(i, torch.zeros_like(v_now)) + (1 - self.beta2) * v_now
        self.v[i] = v
        scaled = u / v.sqrt()
        u = scaled * (u.norm() / scaled.norm())
        lr = self.lr * math.sqrt(max(1.0, rows / cols))
        decay = (u * p >= 0).float()  # cautious: only where update and weight agree in sign
        near_zero = u.abs() < 1e-5 * u.pow(2).mean().sqrt()
        self.ambiguous[i] = self.ambiguous.get(i, torch.zeros_like(near_zero)) | near_zero
        return p - lr * u - lr * self.wd * p * decay


class RefAdamW:
    def __init__(self, lr, betas, eps, wd):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.m, self.v, self.t = {}, {}, {}

    def step(self, i, p, g):
        t = self.t[i] = self.t.get(i, 0) + 1
        m = self.m[i] = self.b1 * self.m.get(i, torch.zeros_like(p)) + (1 - self.b1) * g
        v = self.v[i] = self.b2 * self.v.get(i, torch.zeros_like(p)) + (1 - self.b2) * g * g
        m_hat, v_hat = m / (1 - self.b1 ** t), v / (1 - self.b2 ** t)
        p = p * (1 - self.lr * self.wd)
        return p - self.lr * m_hat / (v_hat.sqrt() + self.eps)


# ------------------------------------------------------------------------------------------------------------
# (a) one rank: the optimizer equals the reference step for step

def test_single_rank_matches_reference():
    torch.manual_seed(0)
    shapes = {"wide": (16, 40), "tall": (48, 16), "square": (24, 24)}
    muon = {k: [torch.randn(*s) * 0.1 for _ in range(n)] for (k, s), n in zip(shapes.items(), (3, 2, 1))}
    adam = {"embedding": [torch.randn(30, 8)], "lm_head": [torch.randn(30, 8) * 0.01],
            "x0_lambdas": [torch.full((5,), 0.1)], "resid_lambdas": [torch.ones(5)]}
    groups = [dict(kind="muon", params=[nn.Parameter(t.clone()) for t in muon[k]], lr=0.05, momentum=0.9,
                   beta2=0.9, weight_decay=0.4) for k in shapes]
    groups += [dict(kind="adamw", params=[nn.Parameter(t.clone()) for t in ts], lr=0.02 * (j + 1),
                    betas=(0.8, 0.95 + 0.01 * j), eps=1e-10, weight_decay=0.1 * j)
               for j, ts in enumerate(adam.values())]
    opt = MuonAdamW(groups)
    refs = []
    for g in groups:
        if g["kind"] == "muon":
            refs.append(RefMuon(g["lr"], g["momentum"], g["beta2"], g["weight_decay"]))
        else:
            refs.append(RefAdamW(g["lr"], g["betas"], g["eps"], g["weight_decay"]))
    ref_params = [[p.detach().clone() for p in g["params"]] for g in groups]
    start = [[p.detach().clone() for p in g["params"]] for g in groups]

    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        # the trainer's knobs move between steps: the optimizer must read them each time
        lrm, mom, wd = 1.0 - 0.1 * step, 0.85 + 0.02 * step, 0.4 * (1 - step / 6)
        apply_schedule(opt, lrm, momentum=mom, weight_decay=wd)
        for ref, g in zip(refs, opt.param_groups):
            ref.lr = g["lr"]
            if isinstance(ref, RefMuon):
                ref.momentum, ref.wd = mom, wd
        for gi, g in enumerate(groups):
            for i, p in enumerate(g["params"]):
                grad = torch.randn(p.shape, generator=gen)
                p.grad = grad.clone()
                ref_params[gi][i] = refs[gi].step(i, ref_params[gi][i], grad)
        opt.step()
        opt.zero_grad()

    n_ambiguous = 0
    for gi, g in enumerate(groups):
        for i, p in enumerate(g["params"]):
            assert not torch.allclose(p, start[gi][i], atol=1e-3), "the parameter barely moved: test is vacuous"
            keep = ~refs[gi].ambiguous[i] if isinstance(refs[gi], RefMuon) else torch.ones_like(p, dtype=torch.bool)
            n_ambiguous += int((~keep).sum())
            torch.testing.assert_close(p.detach()[keep], ref_params[gi][i][keep], rtol=1e-5, atol=2e-6)
    assert n_ambiguous <= 3


def test_fused_adamw_kernel_matches_plain():
    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        p, m, v, st = [torch.randn(37), torch.randn(4, 5)], [torch.zeros(37), torch.zeros(4, 5)], \
            [torch.zeros(37), torch.zeros(4, 5)], [torch.zeros(()), torch.zeros(())]
        gen = torch.Generator().manual_seed(3)
        try:
            for _ in range(4):
                g = [torch.randn(t.shape, generator=gen) for t in p]
                adamw_update_(p, g, m, v, st, lr=0.03, beta1=0.8, beta2=0.95, eps=1e-10, weight_decay=0.2, fused=fused)
        except RuntimeError as e:  # a torch without a CPU fused kernel
            pytest.skip(f"fused AdamW unavailable on CPU: {e}")
        out[fused] = (p, st)
    for a, b in zip(out[False][0], out[True][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [float(s) for s in out[True][1]] == [4.0, 4.0]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="inductor's CPU kernels need a C++ compiler (.ci/setup has g++)")
def test_compiled_updates_match_eager():
    """compile_updates() (what a compiled training run does on any device): the same Muon and AdamW steps as eager
    to rounding, on fp32 parameters through the optimizer and on bf16-stored ones (the embeddings' storage on a
    bf16 device), whose fp32 arithmetic is written back in bf16."""
    runs = []
    for compiled in (False, True):
        model = make_model()
        opt = make_optimizer(model)
        if compiled:
            opt.compile_updates()
        train(model, opt, range(2))  # later, AdamW's normalised steps amplify rounding where v is near 0
        runs.append(snapshot(model))
    moved = snapshot(make_model())
    for name, eager in runs[0].items():
        assert not torch.equal(eager, moved[name]), f"{name} did not move: the comparison is vacuous"
        torch.testing.assert_close(runs[1][name], eager, rtol=1e-5, atol=5e-6, msg=name)  # measured <= 1.4e-6

    out = []
    for update in (adamw_tensor_update_, torch.compile(adamw_tensor_update_, dynamic=False, fullgraph=True)):
        torch.manual_seed(0)
        p = torch.randn(64, 32).bfloat16()
        m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())
        for _ in range(3):
            adamw_update_([p], [torch.randn(p.shape).bfloat16()], [m], [v], [step], lr=0.03, beta1=0.8, beta2=0.95,
                          eps=1e-10, weight_decay=0.2, update=update)
        assert float(step) == 3
        out.append((p, m, v))
    for eager, compiled in zip(*out):  # bf16 storage: within one rounding of bf16 (2^-8 relative)
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=2**-8, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# (b) Polar Express

@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 384)])
def test_polar_express_singular_values_near_one(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    s_in = torch.linalg.svdvals(G)
    assert s_in.max() / s_in.min() > 2.5  # a spread spectrum goes in
    s = torch.linalg.svdvals(polar_express(G))
    # Polar Express lands every singular value in a narrow band around 1 (NS5's band is about [0.5, 1.5])
    assert s.min() > 0.8 and s.max() < 1.2, (s.min().item(), s.max().item())
    assert abs(s.mean().item() - 1) < 0.05
    # and the full direction (MuonEq -> Polar Express -> Muon+) has exactly the semi-orthogonal norm
    d = renormalize(polar_express(row_equilibrate(G)))
    assert abs(d.norm().item() - math.sqrt(min(shape))) < 1e-3
    # a scaled input gives the same output (the iteration normalises first)
    torch.testing.assert_close(polar_express(G * 1e3), polar_express(G), rtol=1e-4, atol=1e-5)


def test_row_equilibrate_sets_rows_to_mean_norm():
    torch.manual_seed(0)
    X = torch.randn(8, 20) * torch.logspace(-2, 2, 8)[:, None]
    Y = row_equilibrate(X)
    target = X.norm() / math.sqrt(8)
    torch.testing.assert_close(Y.norm(dim=1), torch.full((8,), target.item()), rtol=1e-5, atol=0)
    torch.testing.assert_close(Y / Y.norm(dim=1, keepdim=True), X / X.norm(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------------------------------
# (d) cautious weight decay

def test_cautious_weight_decay_only_where_signs_agree():
    torch.manual_seed(0)
    P0, G = torch.randn(32, 64), torch.randn(32, 64)
    lr, wd = 0.05, 0.5
    after = {}
    for decay in (0.0, wd):
        p = nn.Parameter(P0.clone())
        opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, weight_decay=decay)])
        p.grad = G.clone()
        opt.step()
        after[decay] = p.detach().clone()
    u = (P0 - after[0.0]) / lr  # the update direction itself (lr factor is 1 for a wide matrix)
    agree = (u * P0) >= 0
    assert 0.2 < agree.float().mean() < 0.8  # both cases occur
    decayed = after[wd] - after[0.0]
    torch.testing.assert_close(decayed[agree], -lr * wd * P0[agree], rtol=1e-4, atol=1e-6)
    assert torch.all(decayed[~agree].abs() < 1e-6)


def test_adamw_weight_decay_is_not_cautious():
    p = nn.Parameter(torch.tensor([1.0, -1.0, 2.0]))
    opt = MuonAdamW([dict(kind="adamw", params=[p], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.5)])
    p.grad = torch.zeros(3)  # zero gradient: only the decay moves the weights, everywhere
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -1.0, 2.0]) * (1 - 0.05))


# ------------------------------------------------------------------------------------------------------------
# Upstream's groups, LR scales and schedules

def test_build_optimizer_groups_and_lr_scales():
    P = lambda *s: nn.Parameter(torch.zeros(*s))
    groups = {"matrix": [P(3072, 768), P(768, 768), P(768, 3072), P(768, 768)], "wte": [P(100, 1536)],
              "lm_head": [P(100, 1536)], "value_embeds": [P(100, 1536)], "resid": [P(4)],
              "x0": [P(4)], "smear": [P(1)], "router": []}
    opt = build_optimizer(groups, d_model=1536, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02,
                          scalar_lr=0.5, weight_decay=0.28)
    by = {g["name"]: g for g in opt.param_groups}
    s = (1536 / 768) ** -0.5
    assert by["lm_head"]["lr"] == pytest.approx(0.008 * s) and by["lm_head"]["betas"] == (0.8, 0.96)
    assert by["embedding"]["lr"] == pytest.approx(0.3 * s) and by["embedding"]["weight_decay"] == 0.001
    assert by["value_embeds"]["lr"] == pytest.approx(0.3 * s * 0.5)
    assert by["resid_lambdas"]["lr"] == pytest.approx(0.005)  # scalars are not width-scaled
    assert by["x0_lambdas"]["lr"] == pytest.approx(0.5) and by["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert by["smear"]["lr"] == pytest.approx(0.2)
    assert "router" not in by
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert [g["name"] for g in muon] == ["matrix_768x768", "matrix_768x3072", "matrix_3072x768"]
    assert all(g["lr"] == 0.02 and g["weight_decay"] == 0.28 and g["beta2"] == 0.9 and g["momentum"] == 0.95
               for g in muon)
    assert len(muon[0]["params"]) == 2
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    apply_schedule(opt, 0.5, momentum=0.9, weight_decay=0.1)
    assert by["lm_head"]["lr"] == pytest.approx(0.004 * s) and by["lm_head"]["weight_decay"] == 0.01
    assert muon[0]["momentum"] == 0.9 and muon[0]["weight_decay"] == 0.1 and muon[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="unknown parameter group"):
        build_optimizer({"matrices": [P(4, 4)]}, d_model=768, unembedding_lr=0.008, embedding_lr=0.3,
                        matrix_lr=0.02, scalar_lr=0.5)


def test_schedules_match_upstream():
    n = 1000  # warm-down covers the last 650 steps
    assert lr_multiplier(0, n) == pytest.approx(1 / 40) and lr_multiplier(39, n) == 1.0
    assert lr_multiplier(350, n) == 1.0
    assert lr_multiplier(1000, n) == pytest.approx(0.05)
    assert lr_multiplier(675, n) == pytest.approx(0.5 + 0.5 * 0.05)
    assert muon_momentum(0, n) == pytest.approx(0.85) and muon_momentum(200, n) == pytest.approx(0.91)
    assert muon_momentum(300, n) == pytest.approx(0.94)  # warm-up wins over warm-down below step 400
    assert muon_momentum(400, n) == pytest.approx(0.97 * (1 - 50 / 650) + 0.90 * 50 / 650)
    assert muon_momentum(1000, n) == pytest.approx(0.90)
    n2 = 10_000
    assert muon_momentum(1000, n2) == pytest.approx(0.97)
    assert muon_weight_decay(0, n, 0.2) == pytest.approx(0.2) and muon_weight_decay(500, n, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(1000, n, 0.2) == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------------------
# (c) 2 ranks over gloo == 1 rank, sharded state round-trips

VOCAB, D, H, B_GLOBAL, T, STEPS, SAVE_AT = 67, 17, 34, 8, 6, 5, 2


class Tiny(nn.Module):
    """Sizes picked for the sharding edge cases: wte and lm_head have an odd numel (1139 >= 1024: flat-sharded
    with padding), the value embedding an even one (2278: no padding), the Muon groups hold 3 matrices (k=2
    per rank, one zero pad) and 1 matrix (rank 1 owns none), and the lambdas are all-reduced whole."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.ve = nn.Embedding(VOCAB, H)
        self.fc = nn.ModuleList(nn.Linear(D, H, bias=False) for _ in range(3))
        self.proj = nn.ModuleList(nn.Linear(H, D, bias=False) for _ in range(3))
        self.mix = nn.Linear(D, D, bias=False)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(3))
        self.x0_lambdas = nn.Parameter(torch.full((3,), 0.1))

    def param_groups(self):
        return {"matrix": [m.weight for m in (*self.fc, *self.proj, self.mix)], "embedding": [self.wte.weight],
                "value_embeds": [self.ve.weight], "lm_head": [self.lm_head.weight],
                "resid_lambdas": [self.resid_lambdas], "x0_lambdas": [self.x0_lambdas]}

    def forward(self, idx, targets):
        x0 = x = F.rms_norm(self.wte(idx), (D,))
        for i in range(3):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            h = torch.tanh(self.fc[i](F.rms_norm(x, (D,))))
            if i == 2:
                h = h + self.ve(idx)
            x = x + self.proj[i](h)
        logits = self.lm_head(F.rms_norm(self.mix(x), (D,)))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def make_model():
    torch.manual_seed(0)
    return Tiny()


def make_optimizer(model, reduce_scatter=None):
    return build_optimizer(model.param_groups(), d_model=D, unembedding_lr=0.008, embedding_lr=0.3,
                           matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28, reduce_scatter=reduce_scatter)


def batch(step, rank, world_size):
    gen = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, VOCAB, (B_GLOBAL, T + 1), generator=gen)
    per = B_GLOBAL // world_size
    local = data[rank * per:(rank + 1) * per]
    return local[:, :-1], local[:, 1:]


def train(model, opt, steps, rank=0, world_size=1):
    for step in steps:
        x, y = batch(step, rank, world_size)
        model(x, y).backward()
        apply_schedule(opt, lr_multiplier(step, STEPS, warmup_steps=2), momentum=muon_momentum(step, STEPS),
                       weight_decay=muon_weight_decay(step, STEPS, 0.28))
        opt.step()
        opt.zero_grad(set_to_none=True)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_all(rank, world_size, reduce_scatter):
    """Uninterrupted run, and a run checkpointed after SAVE_AT steps then resumed in fresh objects."""
    model = make_model()
    opt = make_optimizer(model, reduce_scatter)
    train(model, opt, range(SAVE_AT), rank, world_size)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    opt_state_shapes = {k: {n: tuple(t.shape) for n, t in v.items() if torch.is_tensor(t)}
                        for k, v in opt.state_dict()["state"].items()}
    train(model, opt, range(SAVE_AT, STEPS), rank, world_size)
    full = snapshot(model)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = Tiny()
    model2.load_state_dict(ckpt["model"])
    opt2 = make_optimizer(model2, reduce_scatter)
    opt2.load_state_dict(ckpt["optim"])
    train(model2, opt2, range(SAVE_AT, STEPS), rank, world_size)
    return full, snapshot(model2), opt_state_shapes, ckpt["optim"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for mode in (False, True):  # all-reduce + slice (gloo's default), then reduce-scatter
            results[mode] = run_all(rank, world_size, mode)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_rank_results():
    torch.set_num_threads(1)
    return run_all(0, 1, None)


def assert_params_close(a, b, rtol):
    assert a.keys() == b.keys()
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-12)
        err = (a[k] - b[k]).abs().max() / scale
        assert err <= rtol, f"{k}: relative error {err.item():.2e}"


@pytest.mark.parametrize("reduce_scatter", [False, True], ids=["allreduce", "reducescatter"])
def test_two_ranks_equal_one_rank(two_rank_results, one_rank_results, reduce_scatter):
    ref_full, ref_resumed, _, _ = one_rank_results
    start = snapshot(make_model())
    assert all((ref_full[k] - start[k]).abs().max() > 1e-3 for k in start), "some parameter never trained"
    for rank in range(2):
        full, resumed, _, _ = two_rank_results[rank][reduce_scatter]
        assert_params_close(full, ref_full, 1e-5)
        # every rank ends with the same (all-gathered) parameters
        other = two_rank_results[1 - rank][reduce_scatter][0]
        assert all(torch.equal(full[k], other[k]) for k in full)
        # the checkpointed-and-resumed run continues exactly
        assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert all(torch.equal(ref_full[k], ref_resumed[k]) for k in ref_full)


def test_two_rank_state_is_sharded(two_rank_results, one_rank_results):
    one = one_rank_results[2]
    for rank in range(2):
        shapes = two_rank_results[rank][False][2]
        assert shapes.keys() == one.keys()
        for idx, s in shapes.items():
            if "exp_avg" in s and math.prod(one[idx]["exp_avg"]) >= 1024:  # wte, lm_head (1139 -> 570 + 569), ve (2278)
                n = math.prod(one[idx]["exp_avg"])
                assert s["exp_avg"] == ((n + 1) // 2 if rank == 0 else n // 2,)
            elif "momentum_buffer" in s:
                K = one[idx]["momentum_buffer"][0]
                assert s["momentum_buffer"][0] == (K + 1) // 2  # ceil(K / 2) matrices per rank
            else:
                assert s == one[idx]  # small tensors: replicated
        sd = two_rank_results[rank][False][3]
        assert sd["world_size"] == 2 and sd["shard_layout"]["rank"] == rank


def test_state_saved_at_another_world_size_is_refused(two_rank_results):
    model = make_model()
    opt = make_optimizer(model)
    with pytest.raises(ValueError, match="world size"):
        opt.load_state_dict(two_rank_results[0][False][3])


# ------------------------------------------------------------------------------------------------------------
# RL's learning rates: its own, as upstream's chat_rl, not pretraining's

def test_rl_optimizer_gets_upstreams_chat_rl_learning_rates():
    from nanochat.config import Config
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.stages.training import fine_tuning_optimizer

    torch.manual_seed(0)
    model = GPT.build(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
                      device="cpu")
    rl = Config().rl
    assert (rl.embedding_lr, rl.unembedding_lr, rl.matrix_lr, rl.init_lr_frac) == (0.2, 0.004, 0.02, 0.05)
    optimizer = fine_tuning_optimizer(model, rl, rl.init_lr_frac, weight_decay=0.0)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    s = (64 / 768) ** -0.5  # the AdamW rates scale as 1/sqrt(d_model), tuned at 768
    assert lrs["embedding"] == pytest.approx(0.2 * s * 0.05)
    assert lrs["lm_head"] == pytest.approx(0.004 * s * 0.05)
    assert all(lr == pytest.approx(0.02 * 0.05) for name, lr in lrs.items() if name.startswith("matrix_"))
    assert all(group["initial_lr"] == group["lr"] for group in optimizer.param_groups)
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups if group["kind"] == "muon")


# (d) fp16: an overflow on one rank makes every rank skip the step together (no rank waits in a collective alone)

def _overflow_worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=30))
    try:
        model = make_model()
        opt, scaler = make_optimizer(model), torch.amp.GradScaler("cpu", init_scale=2.0**8)
        before, scales = snapshot(model), []
        for step in range(2):
            x, y = batch(step, rank, world_size)
            scaler.scale(model(x, y)).backward()
            if step == 0 and rank == 1:
                model.fc[0].weight.grad[0, 0] = float("inf")
            apply_schedule(opt, 1.0)
            optimizer_step(opt, scaler)
            opt.zero_grad(set_to_none=True)
            scales.append(scaler.get_scale())
            if step == 0:
                skipped = snapshot(model)
        torch.save({"skipped": all(torch.equal(before[k], skipped[k]) for k in before),
                    "moved": any(not torch.equal(skipped[k], v) for k, v in snapshot(model).items()),
                    "scales": scales}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_an_fp16_overflow_on_one_rank_skips_the_step_on_both(tmp_path):
    mp.spawn(_overflow_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        assert result["skipped"] and result["moved"]  # step 0 skipped by both ranks, step 1 taken by both
        assert result["scales"] == [2.0**7, 2.0**7]  # halved once, for the overflow, on both
