"""`python -m experiments.bench gpu [--dry]`: proof, on a fresh GPU node, that the project's GPU path works, as
one table with a row per check: ok, FAIL, or skipped with the reason, and the figure it measured. Exit 0 when
every check that ran is ok, 1 when one FAILed. A check that raises is a FAIL with the exception's first line;
the others still run.

The GPU run uses the speedrun's settings (bf16, torch.compile, 2048-token rows, vocab 32768, device batch 32,
halved until it fits) and takes a few minutes on an H100, most of it compiling. `--dry` runs the same checks
CPU-sized (fp32 except where a check compares with bf16; compile with the aot_eager backend, which traces
forward and backward without generating kernels); the rows that need CUDA say so.

Tolerances, with u = 2^-8 the unit roundoff of bf16's 8-bit significand:
- bf16 vs fp32, loss 1e-2: the loss averages thousands of per-token losses whose rounding errors mostly cancel
  (~1e-4 measured at d2-d4), so 1e-2 (~2.5 u) only admits a systematic error, such as a wrong cast or scale.
- bf16 vs fp32, gradient 5e-2 (relative L2 over all parameters): a gradient passes a few bf16 roundings per
  layer, ~sqrt(n) u for n roundings: ~1-2% at d4 (1.1% measured on CPU); a broken kernel is off by ~100%.
- attention, bf16 2e-2: the inputs are the same bf16 tensors for both sides, so only the kernel's own roundings
  differ (its probabilities are rounded to bf16 before multiplying the values): a few u (CPU bf16 SDPA at T=512:
  0.2% on the output, 0.6% on the gradients). fp32: 1e-4.
- compile on/off, loss 1e-3 (bf16) or 1e-4 (fp32): the same math in another order; a rounding difference
  averaged over the batch is far smaller.
- fp8 on/off, loss 5e-2: e4m3 keeps 4 significant bits (u = 2^-4 per element, tensorwise scaled); averaged over
  the batch the loss moves well under that, while a broken scale moves it by a large factor.
"""

import gc
import importlib.util
import math
import tempfile
import time
from dataclasses import dataclass, replace

import torch

from experiments.attention_check import Skipped, check_backend, relative_error
from experiments.bench_infer import bandwidth_peak, build_engine, markdown_table, measure
from experiments.random_model import every_path_active
from experiments.train_timing import (build_for_training, mfu, random_batch, time_training_steps,
                                      timed_step, with_backend)
from nanochat import attention as attn
from nanochat.common import UserError
from nanochat.distributed import compute_dtype
from nanochat.gpt import GPT, model_config_for_depth

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the GPU's, or --dry's."""
    device: torch.device
    vocab: int
    seq_len: int
    small_depth: int  # of the bf16 vs fp32 and compile checks
    batch: int  # their rows
    compile_backend: str
    train_depths: tuple[int, ...]  # the MFU rows; the first also serves the fp8 and checkpoint rows
    train_batch: int  # the first try; halved while it does not fit
    steps: int
    warmup: int
    attention_check_shape: tuple[int, int, int, int, int]  # (B, T, heads, kv heads, head dim), with GQA
    attention_speed_shape: tuple[int, int, int, int, int]  # the d12 model's
    attention_window: int  # left extent of the short window
    decode_depth: int
    decode_prompt: int
    decode_tokens: int
    decode_batches: tuple[int, ...]


GPU_PLAN = Plan(device=torch.device("cuda"), vocab=32768, seq_len=2048, small_depth=4, batch=8,
                compile_backend="inductor", train_depths=(12, 20), train_batch=32, steps=20, warmup=3,
                attention_check_shape=(2, 2048, 6, 2, 128), attention_speed_shape=(32, 2048, 6, 6, 128),
                attention_window=512, decode_depth=20, decode_prompt=512, decode_tokens=64, decode_batches=(1, 32))
DRY_PLAN = replace(GPU_PLAN, device=torch.device("cpu"), vocab=512, seq_len=128, small_depth=1, batch=2,
                   compile_backend="aot_eager", train_depths=(1, 2), train_batch=2, steps=3, warmup=1,
                   attention_check_shape=(2, 128, 4, 2, 32), attention_speed_shape=(2, 128, 4, 2, 32),
                   attention_window=32, decode_depth=2, decode_prompt=16, decode_tokens=8, decode_batches=(1, 4))


@dataclass
class Row:
    check: str
    status: str  # "ok", "FAIL" or "skipped: <why>"
    figure: str
    seconds: float

    def cells(self) -> list[str]:
        return [self.check, self.status, self.figure, f"{self.seconds:.1f}"]


@dataclass
class Trained:
    """A model timed at the speedrun's settings, kept for the rows that build on it."""
    model: GPT
    optimizer: object
    batch: tuple
    timing: object  # train_timing.StepTiming


class GpuCheck:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.dtype = compute_dtype(plan.device.type)[0]  # what the models train in here
        self.rows: list[Row] = []
        self.peaks: dict[str, int] = {}  # what -> peak bytes allocated, CUDA only
        self._trained: dict[int, Trained] = {}
        self._depth = None  # of the models compiled so far

    def needs_cuda(self) -> None:
        if self.plan.device.type != "cuda":
            raise Skipped("no CUDA" if not torch.cuda.is_available() else "no CUDA under --dry (CPU)")

    def run(self, name: str, body) -> None:
        """One row: `body()` returns (passed, figure), or raises Skipped; anything else it raises is a FAIL."""
        start = time.perf_counter()
        try:
            passed, figure = body()
            status = "ok" if passed else "FAIL"
        except Skipped as reason:
            status, figure = f"skipped: {reason}", ""
        except Exception as exc:  # noqa: BLE001  one broken check must not hide the others
            status, figure = "FAIL", f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        if status == "FAIL":
            self.release()  # what the failed check held, out of the except block where its traceback kept it
        row = Row(name, status, figure, time.perf_counter() - start)
        self.rows.append(row)
        print("| " + " | ".join(row.cells()) + " |", flush=True)

    # -- the checks ----------------------------------------------------------------------------------------------

    def bf16_vs_fp32(self):
        """One forward and backward of the same weights and batch in fp32 and in bf16: loss and gradients."""
        plan = self.plan
        if plan.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise Skipped("no bf16 on this GPU (it trains in fp16)")
        config = model_config_for_depth(plan.small_depth, plan.vocab, plan.seq_len)
        torch.manual_seed(0)
        reference = every_path_active(GPT.build(config, device=plan.device, compute_dtype=torch.float32))
        low = GPT.build(config, device=plan.device, compute_dtype=torch.bfloat16)
        low.load_state_dict(reference.state_dict())  # the embeddings rounded to bf16, as in training
        batch = random_batch(plan.vocab, plan.batch, plan.seq_len, plan.device)
        losses, grads = [], []
        for model in (reference, low):
            loss = model(*batch)
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
        loss_error, grad_error = abs(losses[1] - losses[0]) / abs(losses[0]), relative_error(grads[1], grads[0])
        return loss_error <= 1e-2 and grad_error <= 5e-2, (f"d{plan.small_depth}: loss rel. diff {loss_error:.1e} "
                                                           f"(tol 1e-2), gradient {grad_error:.1e} (tol 5e-2)")

    def attention(self, row: str):
        plan = self.plan
        tolerance = 2e-2 if self.dtype in LOW_PRECISION else 1e-4
        return check_backend(row, plan.attention_check_shape, plan.attention_speed_shape, plan.attention_window,
                             self.dtype, plan.device, tolerance)

    def compile_on_off(self):
        """The small model stepped eagerly and compiled: the same first loss, and the speed-up."""
        plan = self.plan
        self.at_depth(plan.small_depth)
        timings = {}
        for backend in (None, plan.compile_backend):
            model, optimizer = build_for_training(plan.small_depth, plan.vocab, plan.seq_len, plan.device)
            every_path_active(model)
            batch = random_batch(plan.vocab, plan.batch, plan.seq_len, plan.device)
            timings[backend] = time_training_steps(model, optimizer, batch, plan.steps, plan.warmup, backend)
        eager, fast = timings[None], timings[plan.compile_backend]
        tolerance = 1e-3 if self.dtype in LOW_PRECISION else 1e-4
        error = abs(fast.first_loss - eager.first_loss) / abs(eager.first_loss)
        return error <= tolerance, (f"d{plan.small_depth} B={plan.batch}: loss rel. diff {error:.1e} (tol "
                                    f"{tolerance:.0e}); step eager {1000 * eager.step_s:.1f} ms, "
                                    f"{plan.compile_backend} {1000 * fast.step_s:.1f} ms "
                                    f"({eager.step_s / fast.step_s:.2f}x)")

    def trained(self, depth: int, fp8: bool = False, rows: int | None = None) -> Trained:
        """The model at `depth` timed over plan.steps steps at the speedrun's settings (kept for reuse unless fp8),
        at the largest device batch that fits from `rows` (default plan.train_batch) down."""
        self.at_depth(depth)
        if depth in self._trained and not fp8:
            return self._trained[depth]
        plan = self.plan
        rows = rows or plan.train_batch
        while True:
            model, optimizer = build_for_training(depth, plan.vocab, plan.seq_len, plan.device, fp8=fp8)
            every_path_active(model)  # real logits, so that losses compare (timing is the same)
            batch = random_batch(plan.vocab, rows, plan.seq_len, plan.device)
            try:
                timing = time_training_steps(model, optimizer, batch, plan.steps, plan.warmup, plan.compile_backend)
                break
            except torch.cuda.OutOfMemoryError:
                if rows == 1:
                    raise
            del model, optimizer, batch  # out of the except block, where the traceback no longer holds them
            self.release()
            rows //= 2
        result = Trained(model, optimizer, batch, timing)
        if timing.peak_memory is not None:
            self.peaks[f"d{depth}{' fp8' if fp8 else ''} training, B={rows}"] = timing.peak_memory
        if not fp8:
            self._trained[depth] = result
        return result

    def release(self) -> None:
        gc.collect()
        if self.plan.device.type == "cuda":
            torch.cuda.empty_cache()

    def at_depth(self, depth: int) -> None:
        """Before a model of another depth: drop the models kept so far and the compiled code, as a training run
        of one size starts. Each size compiles the model and Muon's update once per matrix shape, and several
        sizes in one process would pass dynamo's limit of 8 compilations a function, past which it silently
        runs eagerly."""
        if depth != self._depth:
            self._depth = depth
            self._trained.clear()
            torch.compiler.reset()
            self.release()

    def model_flops_utilisation(self, depth: int):
        trained = self.trained(depth)
        timing, B = trained.timing, trained.batch[0].size(0)
        utilisation = mfu(trained.model, timing, self.plan.device)
        share = ("MFU unknown (no peak FLOP/s for this device)" if utilisation is None else
                 f"MFU {100 * utilisation:.1f}%")
        memory = "" if timing.peak_memory is None else f", peak {timing.peak_memory / 2**30:.1f} GiB"
        dtype = str(self.dtype).removeprefix("torch.")
        return math.isfinite(timing.first_loss), (
            f"{share}, {timing.tok_per_sec:,.0f} tok/s, step {1000 * timing.step_s:.1f} ms (median of "
            f"{self.plan.steps}), B={B} T={self.plan.seq_len} {dtype} {self.plan.compile_backend}{memory}")

    def fp8_on_off(self):
        """The first MFU row's model with torchao's fp8 matmuls, as base_train's fp8=true: loss and speed-up."""
        self.needs_cuda()
        major, minor = torch.cuda.get_device_capability(self.plan.device)
        if (major, minor) < (8, 9):
            raise Skipped(f"fp8 needs SM89+, this is SM{major}{minor}")
        if importlib.util.find_spec("torchao") is None:
            raise Skipped("torchao not installed")
        depth = self.plan.train_depths[0]
        base = self.trained(depth)
        trained = self.trained(depth, fp8=True, rows=base.batch[0].size(0))
        converted = sum("Float8" in type(m).__name__ for m in trained.model.modules())
        base, fp8 = base.timing, trained.timing
        error = abs(fp8.first_loss - base.first_loss) / abs(base.first_loss)
        return converted > 0 and error <= 5e-2, (
            f"d{depth}: {converted} fp8 matmuls; loss rel. diff {error:.1e} (tol 5e-2); step "
            f"{1000 * fp8.step_s:.1f} ms, bf16 {1000 * base.step_s:.1f} ms ({base.step_s / fp8.step_s:.2f}x)")

    def checkpoint_stall(self):
        """How long the step that takes an async checkpoint is held up: save() itself (the copy to pinned CPU
        memory) and the next step's slowdown beside the writer thread, as a share of a step."""
        from nanochat.checkpoint import CheckpointManager, rng_state

        depth = self.plan.train_depths[0]
        trained = self.trained(depth)
        step_model = with_backend(trained.model, self.plan.compile_backend)  # the compiled code is cached: no recompile
        with tempfile.TemporaryDirectory(prefix="nanochat-gpu-check-") as folder:
            manager = CheckpointManager(folder, async_save=True)
            start = time.perf_counter()
            manager.save(1, trained.model.state_dict(), trained.optimizer.state_dict(), {"rng": rng_state()}, {})
            blocked = time.perf_counter() - start
            beside, _ = timed_step(step_model, trained.model, trained.optimizer, trained.batch)
            start = time.perf_counter()
            manager.wait()
            writing = time.perf_counter() - start
            saved = manager.complete()
            size = sum(f.stat().st_size for f in saved[-1].iterdir()) if saved else 0
        step = trained.timing.step_s
        slower = beside - step
        stall = blocked + max(0.0, slower)
        return len(saved) == 1, (f"d{depth}: save() {1000 * blocked:.0f} ms + next step {1000 * slower:+.0f} ms = "
                                 f"{stall / step:.0%} of a {1000 * step:.0f} ms step; {size / 2**20:,.0f} MiB written "
                                 f"in the background, {writing:.1f} s after")

    def decode(self, model, engine, batch: int):
        """bench infer's measurement at one batch size: every row decodes to the token budget."""
        plan = self.plan
        peak, _ = bandwidth_peak(plan.device)
        row = measure(model, engine, plan.decode_prompt, batch, plan.decode_tokens, peak)
        g = row.generation
        if g.peak_memory is not None:
            self.peaks[f"d{plan.decode_depth} decode, batch {batch}"] = g.peak_memory
        mbu = "unknown" if row.mbu is None else f"{100 * row.mbu:.1f}%"
        return len(g.step_times) == plan.decode_tokens - 1, (
            f"prompt {plan.decode_prompt}: TTFT {1000 * g.ttft:.1f} ms, TPOT {1000 * g.tpot:.2f} ms, "
            f"{row.decode_tok_per_sec:,.0f} tok/s, MBU {mbu}")

    def peak_memory(self):
        """The most memory any row allocated at once, beside what the device has."""
        self.needs_cuda()
        what, peak = max(self.peaks.items(), key=lambda item: item[1], default=("nothing measured", 0))
        total = torch.cuda.get_device_properties(self.plan.device).total_memory
        return True, f"{peak / 2**30:.1f} GiB of {total / 2**30:.0f} GiB ({what})"

    def all(self) -> bool:
        plan = self.plan
        self.run("bf16 vs fp32", self.bf16_vs_fp32)
        for backend in ("fa3", "fa2", "flex", "sdpa"):
            self.run(f"attention {backend}", lambda backend=backend: self.attention(backend))
        self.run(f"compile on/off d{plan.small_depth}", self.compile_on_off)
        first, *others = plan.train_depths
        self.run(f"MFU d{first}", lambda: self.model_flops_utilisation(first))
        self.run(f"fp8 on/off d{first}", self.fp8_on_off)
        self.run(f"async checkpoint stall d{first}", self.checkpoint_stall)
        for depth in others:
            self.run(f"MFU d{depth}", lambda depth=depth: self.model_flops_utilisation(depth))
        self._trained.clear()  # the decode rows measure the engine's memory alone
        self.release()
        built = []  # (model, engine), built by the first decode row: a failure to build is that row's FAIL

        def decode(batch):
            if not built:
                built.extend(build_engine(plan.decode_depth, plan.vocab, plan.seq_len, plan.device))
            return self.decode(*built, batch)
        for batch in plan.decode_batches:
            self.run(f"decode d{plan.decode_depth} batch {batch}", lambda batch=batch: decode(batch))
        self.run("peak memory", self.peak_memory)
        return not any(row.status == "FAIL" for row in self.rows)


def environment(plan: Plan, dry: bool) -> str:
    """The line above the table: what this node has."""
    if plan.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(plan.device)
        device = f"{torch.cuda.get_device_name(plan.device)} (SM{major}{minor}), CUDA {torch.version.cuda}"
    else:
        device = f"cpu, {torch.get_num_threads()} threads" + (" (--dry)" if dry else "")
    torchao = importlib.util.find_spec("torchao")
    backends = attn.available_backends() + (["flex"] if attn.HAS_FLEX else [])
    return (f"gpu check  torch {torch.__version__} on {device}; attention backends: {', '.join(backends)}; "
            f"torchao {'installed' if torchao else 'not installed'}")


def run_checks(dry: bool) -> bool:
    """Print the table; True when no check FAILed."""
    if not dry and not torch.cuda.is_available():
        raise UserError("no CUDA device here: run it on a GPU node, or with --dry for the CPU-sized checks")
    plan = DRY_PLAN if dry else GPU_PLAN
    print(environment(plan, dry), flush=True)
    print(markdown_table(["check", "status", "figure", "s"], []), flush=True)
    start = time.perf_counter()
    passed = GpuCheck(plan).all()
    print(f"{'all checks that ran are ok' if passed else 'FAILED: see the rows above'} "
          f"({time.perf_counter() - start:.0f} s)")
    return passed
