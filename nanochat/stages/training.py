"""The training loop of every training stage (base_train, mid_train, sft, rl), and what it carries across
resumes: the newest complete checkpoint, counters that survive requeues, the metrics log, and the decision after
every step, agreed by all ranks, to save, stop or requeue.

A stage supplies only what is its own: how one optimizer step's gradients are made (`StepResult` from a
callable; `MicroBatches` for the stages that read a loader), its learning-rate schedule and its periodic
evaluations. `TrainingSession.train` does the rest in the same order for all of them:

    evaluate (when due) -> gradients -> schedule -> optimizer step -> zero_grad -> agree on stopping
        -> every `log_every` steps and before a save: the loss across ranks, logged -> save, stop or requeue
"""

import functools
import gc
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch._functorch import config as functorch_config

from nanochat import lease
from nanochat.checkpoint import CheckpointManager, load_optimizer_state, rng_state, set_rng_state, weights_sha256
from nanochat.common import UserError, print0
from nanochat.config import learning_rates
from nanochat.dataloader import check_data_shards, merge_loader_states
from nanochat.distributed import agree, compute_dtype, peak_flops
from nanochat.host_memory import trim_heap
from nanochat.optim import build_optimizer
from nanochat.schedules import apply_schedule
from nanochat.optim_state import pieces, restore
from nanochat.preemption import HANDLER, KINDS, agreed_reason, count_restarts, stop, stop_record
from nanochat.progress import Progress
from nanochat.reshard import divisors
from nanochat.stages.log_window import LogWindow, log_every
from nanochat.tracking import Tracker
from nanochat.watchdog import WATCHDOG


@dataclass
class StepResult:
    """What one step's gradient pass reports. `loss` as a tensor is this rank's, averaged over the ranks after the
    optimizer step (so the host waits for it only then); as a float it is already the global figure."""
    loss: "torch.Tensor | float"
    tokens: int  # tokens this step trained on, across all ranks
    row: dict = field(default_factory=dict)  # extra metrics for this step's row
    text: str | None = None  # the progress line's stage-specific part; default: the learning-rate multiplier


@dataclass
class Periodic:
    """An evaluation every `every` steps (<= 0: never) and after the last; `run(step)` returns the values to
    record, or None when it only prints."""
    every: int
    run: Callable[[int], "dict | None"]
    at_start: bool = True  # also at step 0 (and at the step a resume starts from)

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step == last or (step % self.every == 0 and (step > 0 or self.at_start)))


# torch.compile on a CPU, only when asked (compile=true): it does not pay for the embedded default from a cold
# cache. Its base_train (150 steps, 2-core Xeon, bf16) ran 1.31x faster a step compiled (7,200 vs 5,500 tok/s),
# but the cold compile took ~85 s: 187 s for the stage against 127-150 s eager (114 s with a warm cache); eager
# has since come down to 79 s. Compiled CPU runs were not reproducible until compiled_for_training turned on
# deterministic algorithms (below).
#
# What share of the activations a compiled CPU step keeps for backward, between inductor's own choice (1.0) and
# recomputing all it can (0.0); lower makes it recompute cheap pointwise work instead of keeping its output. Issue
# 19's d6 config (B=32, T=512, 32k vocab, 2-core Xeon): peak RSS 4.35 -> 3.37 GiB in fp32 and 2.64 -> 2.14 in bf16
# at 0.5, with steps no slower (fp32 13.1-13.5 -> 11.6-12.3 s, bf16 5.1-5.5 -> 5.2-5.3 s: fewer fresh pages to
# fault in); 0.85 kept 3.45 and 2.27 GiB. It costs compile time (the first step 20-25 -> 46-50 s). GPUs keep
# inductor's choice: unmeasured there, where a recomputed kernel costs MFU.
CPU_ACTIVATION_MEMORY_BUDGET = 0.5


def compiled_for_training(model, optimizer, device, dynamic: bool = False):
    """torch.compile(model) for the training steps, and the optimizer's updates with it. On a CPU with deterministic
    algorithms on: inductor's scatter kernels (the embeddings' backward) otherwise add with atomics across threads,
    and two compiled runs from the same seed differed after one step; with them, those fall back to torch's own,
    and a compiled run gives the same weights every time (and resumes exactly). warn_only: an op without a
    deterministic version warns instead of stopping the run."""
    if device.type == "cpu":  # for the rest of the process: with compile=true every training stage compiles
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN pass over every torch.empty
        functorch_config.activation_memory_budget = CPU_ACTIVATION_MEMORY_BUDGET
    model.compiled_loss = True  # the fused loss runs outside the graph: its chunks' elementwise work compiles alone
    optimizer.compile_updates()
    return torch.compile(model, dynamic=dynamic)


@functools.cache
def freeze_setup_garbage() -> None:
    """The objects alive after the first step (the setup's) moved out of the collector's sight, so that it stops
    rescanning them; once a process, as gc is the process's. Asked after every step, hence the cache: the test it
    replaces, gc.get_freeze_count() == 0, walks every frozen object (29 ms a step at 425k objects, 5% of the
    embedded default's CPU step)."""
    gc.collect()
    gc.freeze()


class TrainingSession:
    def __init__(self, cfg, run, stage: str, world, device, model, optimizer, num_iterations: int, *,
                 flops_per_token: float, meta: dict, reported: tuple[str, ...] = ()):
        self.cfg, self.stage, self.world, self.device = cfg, stage, world, device
        self.model, self.optimizer, self.n = model, optimizer, num_iterations
        model.fused_loss = cfg.fused_loss  # the stage's training and evaluation losses
        self.param_names = {p: name for name, p in model.named_parameters()}  # what optimizer state is saved by
        self.flops_per_token, self.meta = flops_per_token, meta
        self.checkpoints = CheckpointManager(run.checkpoints_dir(stage), world.rank, world.world_size,
                                             keep=cfg.keep_checkpoints,
                                             async_save=device.type == "cuda" if cfg.async_save is None else cfg.async_save)
        self.metrics = run.metrics(stage)
        self.tracker = Tracker(cfg, run, stage, rank=world.rank)
        # a plain line every 10 steps in a log: what the line showed before it was a bar
        self.progress = Progress(num_iterations, f"{stage} step", unit="step", every=10, enabled=world.rank == 0)
        # `reported`: figures the summary reports as last seen (val_bpb, reward), None until measured
        # world_sizes: [first step, ranks] each time the stage (re)started on another number of ranks
        self.counters = {"step": 0, "tokens": 0, "elapsed": 0.0, "train_time": 0.0, "loss": float("nan"),
                         "resumes": 0, "requeues": 0, **dict.fromkeys(KINDS, 0), **dict.fromkeys(reported),
                         "world_sizes": [[0, world.world_size]]}
        # fp16 (pre-Ampere GPUs) needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(device.type) if compute_dtype(device.type)[0] == torch.float16 else None
        self.peak = peak_flops(device_name(device)) if device.type == "cuda" else None
        if device.type == "cuda" and self.peak is None:
            print0(f"MFU unknown: no peak FLOP/s on record for {device_name(device)} (nanochat/distributed.py PEAKS)")
        self.log_every = log_every(cfg.log_every, device)
        self.on_stop = []  # called before the stage stops for a signal (e.g. closing loader threads)
        self.compiled = False  # whether the training steps run torch.compile'd (training_forward)
        self.start = self.last_save = time.time()
        self.resumed_meta: dict = {}  # meta.json of the checkpoint this session resumed from

    @property
    def step(self) -> int:
        return self.counters["step"]

    def resume(self) -> dict | None:
        """Restore weights, optimizer, counters and RNG from the newest complete checkpoint; returns this rank's
        saved state (e.g. its dataloader position), or None on a fresh start. A checkpoint written by another
        number of ranks (one nanochat.reshard allows) is resharded: this rank copies the optimizer slices it now
        owns, takes the positions of the virtual data shards it now reads, and old rank 0's RNG and loss scale
        (nothing in a step draws from the global RNG per rank: rl seeds its rollouts by step and prompt)."""
        resumed = self.checkpoints.load(self.device)
        if resumed is None:
            if self.world.rank == 0:  # a start that stopped before its first checkpoint: its rows go
                self.metrics.rewind(lambda row: False)
            return None
        self.model.load_state_dict(resumed["model"])
        started = time.time()
        if resumed["optim"] is not None:
            try:
                copied = restore(self.optimizer, self.param_names, resumed["optim"])
            except ValueError as exc:  # another model or optimizer than the one that wrote it
                raise UserError(f"{resumed['path']}: its optimizer state does not fit this run: {exc}") from None
        elif resumed["step"] < self.n:
            raise UserError(f"checkpoint {resumed['path']} has no optimizer state; cannot resume training from it")
        seconds = time.time() - started
        self.resumed_meta = resumed["meta"]
        counters = count_restarts(resumed["meta"]["counters"], resumed["meta"].get("slurm"), self.cfg, self.stage)
        # over the fresh counters: a checkpoint from an older version lacks the figures added since (None)
        self.counters = {**self.counters, **counters, "resumes": counters["resumes"] + 1,
                         "world_sizes": self._world_sizes(counters, resumed["written_by"])}
        rank_state = resumed["rank_state"]
        if "rank_states" in resumed and "loader" in rank_state:  # another world size: its ranks' shard positions
            rank_state = {**rank_state, "loader": merge_loader_states([s["loader"] for s in resumed["rank_states"]])}
        set_rng_state(rank_state["rng"])
        if self.scaler and "scaler" in rank_state:  # fp16: the loss scale it had found, not the default
            self.scaler.load_state_dict(rank_state["scaler"])
        if self.world.rank == 0:  # rows past the checkpoint are logged again; an eval at its step is redone
            s = self.step
            self.metrics.rewind(lambda row: row["step"] < s or (row["step"] == s and "loss" in row))
        line = f"resumed from {resumed['path'].name} (step {self.step}/{self.n})"
        if "rank_states" in resumed:
            line += f", resharded from {resumed['written_by']} to {self.world.world_size} ranks"
            if resumed["optim"] is not None:
                line += f" (rank 0 copied its {copied / 2**20:,.1f} MiB of optimizer state in {seconds:.2f} s)"
        print0(line)
        self.start = time.time() - self.counters["elapsed"]
        return rank_state

    def _world_sizes(self, counters: dict, written_by: int) -> list:
        """The saved [first step, ranks] list, with this job's world size added when it differs from the last."""
        history = counters.get("world_sizes") or [[0, written_by]]  # a checkpoint from an older version kept none
        ranks = self.world.world_size
        return history if history[-1][1] == ranks else [*history, [counters["step"], ranks]]

    def data_shards(self, requested: int, accum: int) -> int:
        """The virtual data shards of this stage's loader: `requested`, else as many as the checkpoint it resumed
        from was written with, else one per rank; each rank must get whole shards and read each as often in a
        step (nanochat.dataloader). The world sizes that divide them are recorded as those a later resume may
        use: with them, a step reads the same rows in the same micro-batches."""
        shards = requested or self.resumed_meta.get("data_shards") or self.world.world_size
        check_data_shards(shards, self.world.world_size, accum)
        self.meta.update(data_shards=shards, world_sizes=divisors(shards))
        return shards

    def train(self, gradients: Callable[[int], StepResult], schedule: Callable[[int], tuple[float, dict]],
              evals: Sequence[Periodic] = (), rank_state: Callable[[], dict] = dict) -> None:
        """Run the steps from where the session resumed to the horizon. `gradients(step)` accumulates this step's
        gradients (through `backward`); `schedule(step)` gives the learning-rate multiplier and any Muon momentum
        and weight decay; `rank_state()` what this rank must save besides weights and optimizer."""
        step = self.step
        window = LogWindow(self.device)
        while True:
            due = [evaluation for evaluation in evals if evaluation.due(step, self.n)]
            with window.paused(bool(due)):  # evaluating is not training time
                for evaluation in due:
                    with self.progress.aside():  # an evaluation's lines go above the bar, not into it
                        if values := evaluation.run(step):
                            self._record_eval(step, **values)
            if step == self.n:
                return
            result = gradients(step)
            lrm, knobs = schedule(step)
            apply_schedule(self.optimizer, lrm, **knobs)
            optimizer_step(self.optimizer, self.scaler)
            self.model.zero_grad(set_to_none=True)
            if self.device.type == "cpu":
                trim_heap()  # the step's freed activations back to the OS (nanochat.host_memory)
            window.add(result.loss, result.tokens, result.row, result.text)
            self._end_step(window, lrm, result.tokens, rank_state)
            step = self.step

    def _scaler_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler else {}

    def training_forward(self, dynamic: bool = False):
        """The model the training steps call: torch.compile'd per `compile` (None: on GPU, not on a CPU, see above;
        resuming, as the checkpoint was trained), else the model itself. `dynamic`: the batches' shapes vary (RL's rollouts). Evaluations and sampling call
        the uncompiled model, which shares the weights. Call after resume()."""
        has_compiler = any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++", "clang++")))
        if self.cfg.compile is not None:
            self.compiled, why = self.cfg.compile, f"compile={str(self.cfg.compile).lower()}"
        elif "compiled" in self.resumed_meta:  # the same kernels to the end, whatever this machine would pick
            self.compiled, why = self.resumed_meta["compiled"], "as its checkpoint was trained"
        elif self.device.type == "cuda":
            self.compiled, why = True, "on GPU"
        else:
            self.compiled, why = False, f"{self.device.type}: eager unless asked; compile=true to compile"
        if self.resumed_meta.get("compiled", self.compiled) != self.compiled:
            print0(f"warning: {self.stage} was trained with torch.compile {'on' if not self.compiled else 'off'} "
                   f"so far: from here its results differ from an uninterrupted run's in the last bits")
        if self.compiled and self.device.type == "cpu" and not has_compiler:
            raise UserError(f"{self.stage}: torch.compile on a CPU needs a C++ compiler and there is none (apt-get "
                            f"install g++, or set CXX); or compile=false")
        self.meta["compiled"] = self.compiled  # in every checkpoint, for the resumes
        print0(f"{self.stage}: torch.compile {'on' if self.compiled else 'off'} ({why})")
        return compiled_for_training(self.model, self.optimizer, self.device, dynamic) if self.compiled else self.model

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _record_eval(self, step: int, **values: float) -> None:
        """An evaluation at `step`: printed, logged, and kept in the counters (the summary reports the latest)."""
        self.counters.update(values)
        print0(f"{self.stage} step {step:05d} | " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        self.log({"step": step, **values})

    def log(self, row: dict) -> None:
        row = {**row, "tokens": self.counters["tokens"], "flops": self.flops_per_token * self.counters["tokens"],
               "time": time.time() - self.start}
        if self.world.rank == 0:
            self.metrics.log(row)
        self.tracker.log(row)

    def mfu(self, tok_per_sec: float) -> float | None:
        """Model FLOPs utilisation in percent of all ranks' peak; None where the peak is unknown (CPU, an
        unlisted GPU): a guessed peak would make a wrong number."""
        if self.peak is None:
            return None
        return 100 * self.flops_per_token * tok_per_sec / (self.peak * self.world.world_size)

    def _end_step(self, window: LogWindow, lrm: float, tokens: int, rank_state) -> None:
        """After an optimizer step: count it, then log the steps since the last logged one when `log_every` says
        so or before a save, then save, stop or requeue as the ranks agree. `rank_state()` returns what this rank
        must save besides weights and optimizer (its data position)."""
        step = self.step + 1
        self.counters.update(step=step, tokens=self.counters["tokens"] + tokens)  # every row's count, evaluations' too
        self.checkpoints.poll()
        overdue = self.cfg.save_every_minutes > 0 and time.time() - self.last_save > 60 * self.cfg.save_every_minutes
        # one all-reduce: a signal reached some rank; some rank's save timer fired (clocks differ between nodes);
        # rank 0 lost the run's lease to another writer (then this process must not write again)
        stopping, overdue, lease_lost = agree(HANDLER.requested, overdue, lease.lost() is not None)
        WATCHDOG.beat(step_done=True)  # from now on the step timeout, not the start-up one
        if lease_lost:
            raise UserError(f"{self.stage} stopped at step {step} without saving: another process took over this "
                            f"run's lease (see its lease.json); the run is theirs now")
        stopping = stopping and step < self.n
        reason = agreed_reason(self.world.rank, self.counters, self.cfg) if stopping else None
        saving = stopping or step == self.n or overdue or (self.cfg.save_every > 0 and step % self.cfg.save_every == 0)
        logging = saving or step % self.log_every == 0  # a checkpoint's counters count every step before it
        if logging:
            self._log_window(step, window, lrm)
        if saving:
            self.save(rank_state(), reason)
        if stopping:
            self.progress.close()  # the log's last line says where it stopped
            self.checkpoints.wait()
            for close in self.on_stop:
                close()
            stop(f"{self.stage} stopped at step {step}/{self.n} after saving a checkpoint", reason, self.world.rank)
        freeze_setup_garbage()
        if logging:
            window.restart()  # the time of the log, the save and the collection is not training time

    def _log_window(self, step: int, window: LogWindow, lrm: float) -> None:
        """Count, check and log the window's steps (one row, one progress line): the host waits for the device."""
        closed = window.close()
        loss = closed.loss
        self.counters.update(loss=closed.last_loss, train_time=self.counters["train_time"] + closed.seconds)
        if loss != loss or abs(loss) == float("inf"):
            last = self.checkpoints.complete()
            raise UserError(f"loss is {loss} at step {step}: training diverged; the last good checkpoint is "
                            f"{last[-1] if last else 'none (no checkpoint was saved yet)'}")
        tok_per_sec = closed.tokens / closed.seconds
        mfu = self.mfu(tok_per_sec)
        self.log({"step": step, "loss": loss, "dt": closed.seconds / closed.steps, "tok_per_sec": tok_per_sec,
                  "mfu": mfu, **closed.row, "lrm": lrm})
        shown = "" if mfu is None else f" | mfu {mfu:.1f}%"
        text = f" | lrm {lrm:.2f}" if closed.text is None else closed.text
        self.progress.update(step, f"loss {loss:.4f}{text} | {tok_per_sec:,.0f} tok/s{shown}")

    def save(self, rank_state: dict, reason: str | None = None) -> None:
        """`reason`: why the ranks are stopping (preemption.REASONS), None for a periodic save; a resume in the
        same Slurm job counts its restarts since from it."""
        self.counters["elapsed"] = time.time() - self.start
        self.checkpoints.save(self.step, self.model.state_dict() if self.world.rank == 0 else None,
                              pieces(self.optimizer, self.param_names),
                              {**rank_state, "rng": rng_state(), **self._scaler_state()},
                              {**self.meta, "counters": self.counters, "num_iterations": self.n, "stage": self.stage,
                               "slurm": stop_record(reason)})
        self.last_save = time.time()

    def finish(self, keep_optimizer: bool = False, **extra) -> dict:
        """Keep the final checkpoint only (with its optimizer state when `keep_optimizer`), and return the summary
        fields every training stage shares."""
        self.progress.close()
        self.checkpoints.finish(keep_optimizer)
        wall = time.time() - self.start
        tokens, train_time = self.counters["tokens"], self.counters["train_time"]
        cuda = self.device.type == "cuda"  # world size, GPU type and GPU-hours: added by on_all_ranks
        summary = {
            "step": self.step, "loss": self.counters["loss"], "tokens": tokens,
            "flops": self.flops_per_token * tokens, "wall_time_s": wall,
            "tok_per_sec": tokens / train_time if train_time else 0.0,
            "mfu": self.mfu(tokens / train_time) if train_time else None,
            "requeues": self.counters["requeues"], "resumes": self.counters["resumes"],
            "world_sizes": self.counters["world_sizes"],
            **{kind: self.counters[kind] for kind in KINDS},
            "weights_sha256": weights_sha256(self.model.state_dict()),
            "compiled": self.compiled,  # inductor's kernels round differently from eager: the fingerprint's setting
            "peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
            "num_iterations": self.n,
            "checkpoint": str(self.checkpoints.complete()[-1]) if self.checkpoints.complete() else None,
            **extra,
        }
        self.tracker.finish(summary)
        return summary


def fine_tuning_optimizer(model, cfg, lr_frac: float, weight_decay: float):
    """The learning rates of `cfg` (pretraining's Config, which sft inherits, or RL's own RlConfig) times `lr_frac`,
    for every group: the smear gate's and the router's too, whose full rates (0.2 on a few scalars) knocked a d4
    model out of its chat format within 3 RL steps."""
    optimizer = build_optimizer(model.param_groups(), d_model=model.config.n_embd,
                                **learning_rates(cfg), weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group["lr"] *= lr_frac
        group["initial_lr"] = group["lr"]
    return optimizer


def warm_start(session: TrainingSession, checkpoint_dir) -> bool:
    """Muon's momentum buffers and AdamW's moments from the optimizer state of the checkpoint a stage starts from,
    as upstream's chat_sft (--load-optimizer): the saved hyperparameters are the end of pretraining's schedule, so
    this stage's learning rates and weight decay are kept. On any number of ranks (each loads the slices it owns;
    an older checkpoint's shards only on the number that wrote them). Every rank loads its state, or none does
    (the base checkpoint kept none, or a file is damaged): then the optimizer stays fresh and one line says why."""
    world, optimizer = session.world, session.optimizer
    sources, why_not = load_optimizer_state(checkpoint_dir, world.rank, world.world_size)
    (missing,) = agree(sources is None)
    if missing:
        print0(f"fresh optimizer: no warm start from {checkpoint_dir} ({why_not or 'a peer rank could not load it'})")
        return False
    kept = [{key: group[key] for key in ("lr", "initial_lr", "weight_decay") if key in group}
            for group in optimizer.param_groups]
    try:
        restore(optimizer, session.param_names, sources)
    except ValueError as exc:  # another model than the one it starts from: its moments do not fit
        raise UserError(f"{checkpoint_dir}: its optimizer state does not fit this model ({exc}); "
                        f"{session.stage}.load_optimizer=false starts fresh") from None
    for group, ours in zip(optimizer.param_groups, kept):
        group.update(ours)
    print0(f"optimizer warm-started from {checkpoint_dir} (momentum and moments; this stage's learning rates)")
    return True


def optimizer_step(optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """One optimizer step (which reduces the gradients across ranks); under fp16 through the loss scaler, skipped
    by every rank together when any rank's gradients overflowed: the overflow flag is agreed first (MAX), as a
    rank that skipped the step alone would leave the others waiting in the step's collectives."""
    if scaler is None:
        optimizer.step()
        return
    scaler.unscale_(optimizer)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for found_inf in scaler._found_inf_per_device(optimizer).values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    scaler.step(optimizer)
    scaler.update()


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

