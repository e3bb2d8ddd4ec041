"""What the training stages (base_train, mid_train, sft, rl) share: resuming from the newest complete checkpoint,
counters that survive resumes and requeues, the metrics log, and the decision after every step, agreed by all
ranks, to save, stop or requeue. A stage owns its loop; the session owns what must not differ between them.
"""

import gc
import time

import torch

from nanochat.checkpoint import CheckpointManager, rng_state, set_rng_state, weights_sha256
from nanochat.common import UserError, print0
from nanochat.distributed import agree, peak_flops
from nanochat.optim import build_optimizer
from nanochat.preemption import HANDLER, agreed_requeue, stop
from nanochat.tracking import Progress, Tracker


class TrainingSession:
    def __init__(self, cfg, run, stage: str, world, device, model, optimizer, num_iterations: int, *,
                 flops_per_token: float, meta: dict):
        self.cfg, self.stage, self.world, self.device = cfg, stage, world, device
        self.model, self.optimizer, self.n = model, optimizer, num_iterations
        self.flops_per_token, self.meta = flops_per_token, meta
        self.checkpoints = CheckpointManager(run.checkpoints_dir(stage), world.rank, world.world_size,
                                             keep=cfg.keep_checkpoints, async_save=device.type == "cuda")
        self.metrics = run.metrics(stage)
        self.tracker = Tracker(cfg, run, stage, rank=world.rank)
        self.progress = Progress(num_iterations, enabled=world.rank == 0)
        self.counters = {"step": 0, "tokens": 0, "elapsed": 0.0, "train_time": 0.0, "loss": float("nan"),
                         "resumes": 0, "requeues": 0}
        self.gpu_type = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak = peak_flops(self.gpu_type) if device.type == "cuda" else float("inf")
        self.on_stop = []  # called before the stage stops for a signal (e.g. closing loader threads)
        self.start = self.last_save = time.time()

    @property
    def step(self) -> int:
        return self.counters["step"]

    def resume(self) -> dict | None:
        """Restore weights, optimizer, counters and RNG from the newest complete checkpoint; returns this rank's
        saved state (e.g. its dataloader position), or None on a fresh start."""
        resumed = self.checkpoints.load(self.device)
        if resumed is None:
            return None
        self.model.load_state_dict(resumed["model"])
        if resumed["optim"] is not None:
            self.optimizer.load_state_dict(resumed["optim"])
        elif resumed["step"] < self.n:
            raise UserError(f"checkpoint {resumed['path']} has no optimizer state; cannot resume training from it")
        counters = resumed["meta"]["counters"]
        self.counters = {**counters, "resumes": counters["resumes"] + 1}
        set_rng_state(resumed["rank_state"]["rng"])
        if self.world.rank == 0:  # rows past the checkpoint are logged again; an eval at its step is redone
            s = self.step
            self.metrics.rewind(lambda row: row["step"] < s or (row["step"] == s and "loss" in row))
        print0(f"resumed from {resumed['path'].name} (step {self.step}/{self.n})")
        self.start = time.time() - self.counters["elapsed"]
        return resumed["rank_state"]

    def record_eval(self, step: int, **values: float) -> None:
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

    def end_step(self, loss: float, tokens: int, dt: float, row: dict, rank_state, text: str = "") -> None:
        """After an optimizer step: count it, log it, then save, stop or requeue as the ranks agree.
        `rank_state()` returns what this rank must save besides weights and optimizer (its data position)."""
        step = self.step + 1
        self.counters.update(step=step, loss=loss, tokens=self.counters["tokens"] + tokens,
                             train_time=self.counters["train_time"] + dt)
        if loss != loss or abs(loss) == float("inf"):
            raise RuntimeError(f"loss is {loss} at step {step}: training diverged")
        tok_per_sec = tokens / dt
        mfu = 100 * self.flops_per_token * tok_per_sec / (self.peak * self.world.world_size)
        self.log({"step": step, "loss": loss, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu, **row})
        self.progress.update(step, f"loss {loss:.4f}{text} | {tok_per_sec:,.0f} tok/s | mfu {mfu:.1f}%")

        self.checkpoints.poll()
        overdue = self.cfg.save_every_minutes > 0 and time.time() - self.last_save > 60 * self.cfg.save_every_minutes
        # one all-reduce: a signal reached some rank; some rank's save timer fired (clocks differ between nodes)
        stopping, overdue = agree(HANDLER.requested, overdue)
        stopping = stopping and step < self.n
        requeue_job = stopping and agreed_requeue(self.counters["requeues"], self.cfg.max_requeues)
        self.counters["requeues"] += int(requeue_job)  # counted in the checkpoint saved next
        if stopping or step == self.n or overdue or (self.cfg.save_every > 0 and step % self.cfg.save_every == 0):
            self.save(rank_state())
        if stopping:
            self.checkpoints.wait()
            for close in self.on_stop:
                close()
            stop(f"{self.stage} stopped at step {step}/{self.n} after saving a checkpoint", requeue_job,
                 self.world.rank)
        if gc.get_freeze_count() == 0:  # setup garbage is done: freeze it so the collector stops rescanning it
            gc.collect()
            gc.freeze()

    def save(self, rank_state: dict) -> None:
        self.counters["elapsed"] = time.time() - self.start
        self.checkpoints.save(self.step, self.model.state_dict() if self.world.rank == 0 else None,
                              self.optimizer.state_dict(), {**rank_state, "rng": rng_state()},
                              {**self.meta, "counters": self.counters, "num_iterations": self.n, "stage": self.stage})
        self.last_save = time.time()

    def finish(self, **extra) -> dict:
        """Keep the final weights only, and return the summary fields every training stage shares."""
        self.progress.close()
        self.checkpoints.finish()
        wall = time.time() - self.start
        tokens, train_time = self.counters["tokens"], self.counters["train_time"]
        cuda = self.device.type == "cuda"
        summary = {
            "step": self.step, "loss": self.counters["loss"], "tokens": tokens,
            "flops": self.flops_per_token * tokens, "wall_time_s": wall,
            "tok_per_sec": tokens / train_time if train_time else 0.0,
            "mfu": 100 * self.flops_per_token * tokens / train_time / (self.peak * self.world.world_size)
            if train_time else 0.0,
            "world_size": self.world.world_size, "nodes": self.world.nodes, "gpu_type": self.gpu_type,
            "gpu_hours": wall * self.world.world_size / 3600 if cuda else 0.0,
            "requeues": self.counters["requeues"], "resumes": self.counters["resumes"],
            "weights_sha256": weights_sha256(self.model.state_dict()),
            "peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
            "num_iterations": self.n,
            "checkpoint": str(self.checkpoints.complete()[-1]) if self.checkpoints.complete() else None,
            **extra,
        }
        self.tracker.finish(summary)
        return summary


def fine_tuning_optimizer(model, cfg, lr_frac: float, weight_decay: float):
    """Pretraining's learning rates times `lr_frac`, for every group: the smear gate's and the router's too, whose
    full rates (0.2 on a few scalars) knocked a d4 model out of its chat format within 3 RL steps."""
    optimizer = build_optimizer(model.param_groups(), d_model=model.config.n_embd, embedding_lr=cfg.embedding_lr,
                                unembedding_lr=cfg.unembedding_lr, matrix_lr=cfg.matrix_lr, scalar_lr=cfg.scalar_lr,
                                weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group["lr"] *= lr_frac
        group["initial_lr"] = group["lr"]
    return optimizer


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
