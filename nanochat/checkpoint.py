"""Checkpoints: written atomically, sharded by rank, resumed exactly.

    <stage>/checkpoints/
        step_000120/            a complete checkpoint: the folder only gets this name once everything is in it
            model.pt            the model's state dict (rank 0; every rank holds the full weights)
            optim_rank{r}.pt    each rank's optimizer shard
            state_rank{r}.pt    each rank's dataloader state and RNG states
            meta.json           step, counters, world size, model config; COMPLETE is written after it
        latest                  name of the newest complete checkpoint (for people; loading scans the folder)
        .step_000130.tmp/       a save in progress, or one a crash tore: never loaded, removed by the next save

Saving: every rank writes its files into the .tmp folder and fsyncs them; after a barrier rank 0 writes
meta.json and the COMPLETE marker, renames the folder into place, fsyncs the parent, moves `latest` and prunes
to the newest `keep`. A crash at any point leaves either the previous checkpoints or a new complete one. With
`async_save` (GPU), the state is first copied to pinned CPU memory and the files are written by a background
thread; the checkpoint is finalised (barrier, marker, rename) at a later step boundary, once every rank's
writer has finished, so a crash mid-write never leaves a checkpoint marked complete that is not.
"""

import hashlib
import json
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from nanochat.common import UserError, atomic_write_text, fsync_dir, print0

MARKER = "COMPLETE"


def is_complete(step_dir) -> bool:
    """A step_NNNNNN/ folder every rank finished writing (the marker is written last)."""
    return (Path(step_dir) / MARKER).is_file()


def complete_checkpoints(folder) -> list[Path]:
    """The complete checkpoints in a checkpoints/ folder, oldest first (torn and in-progress saves left out)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("step_*") if is_complete(p)) if folder.is_dir() else []


def latest_meta(folder) -> dict:
    """meta.json of the newest complete checkpoint in a checkpoints/ folder; {} when there is none."""
    complete = complete_checkpoints(folder)
    return json.loads((complete[-1] / "meta.json").read_text()) if complete else {}


def weights_sha256(state_dict: dict) -> str:
    """sha256 over the entries in sorted key order, feeding each key (utf-8) then its tensor as contiguous
    float32 bytes on the CPU: equal weights give equal hashes whatever device or dtype."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode("utf-8"))
        tensor = state_dict[key].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _to_cpu(obj, pin: bool):
    """A copy of every tensor in a nested structure on the CPU (pinned when copying from a GPU)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        out = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=pin)
        return out.copy_(obj.detach(), non_blocking=pin)
    if isinstance(obj, dict):
        return {k: _to_cpu(v, pin) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, pin) for v in obj)
    return obj


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_done(done: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return done
    flag = torch.tensor([int(done)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class CheckpointManager:
    def __init__(self, folder, rank: int = 0, world_size: int = 1, keep: int = 2, async_save: bool = False):
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.keep, self.async_save = max(2, keep), async_save
        self._pending: dict | None = None  # an async save whose files are being written

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, step: int, model_state: dict | None, optim_state: dict, rank_state: dict, meta: dict) -> None:
        """Collective: every rank calls it at the same step. model_state is only needed on rank 0."""
        self.wait()  # at most one save in flight
        tmp = self.folder / f".step_{step:06d}.tmp"
        files = {f"optim_rank{self.rank}.pt": optim_state, f"state_rank{self.rank}.pt": rank_state}
        if self.rank == 0:
            files["model.pt"] = model_state
        meta = {**meta, "step": step, "world_size": self.world_size}
        if not self.async_save:
            self._write(tmp, files)
            self._finalize(step, tmp, meta)
            return
        files = _to_cpu(files, pin=torch.cuda.is_available())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies must land before the writer reads them
        writer = threading.Thread(target=self._write, args=(tmp, files), daemon=True, name="checkpoint-writer")
        writer.start()
        self._pending = {"step": step, "tmp": tmp, "meta": meta, "writer": writer}

    def _write(self, tmp: Path, files: dict) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, obj in files.items():
            _save_file(obj, tmp / name)
        pause = float(os.environ.get("NANOCHAT_TEST_CKPT_PAUSE_S", "0"))  # lets the tests kill a save midway
        if pause:
            import time
            time.sleep(pause)

    def poll(self) -> None:
        """At a step boundary: finalise a pending async save if every rank's writer is done (one tiny
        all-reduce while a save is pending, nothing otherwise)."""
        if self._pending is not None and _all_done(not self._pending["writer"].is_alive()):
            self._finish_pending()

    def wait(self) -> None:
        """Block until a pending async save is complete (before the next save and at the end of a stage)."""
        if self._pending is not None:
            self._pending["writer"].join()
            _all_done(True)  # keeps the ranks' collective calls matched with poll()
            self._finish_pending()

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        self._finalize(pending["step"], pending["tmp"], pending["meta"])

    def _finalize(self, step: int, tmp: Path, meta: dict) -> None:
        _barrier()  # every rank's files are written and fsynced
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            (tmp / MARKER).write_text("")
            fsync_dir(tmp)
            final = self.folder / f"step_{step:06d}"
            if final.exists():  # a complete copy of the same step (saved again after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.folder)
            atomic_write_text(self.folder / "latest", final.name + "\n")
            self._prune()
        _barrier()

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for torn in self.folder.glob(".step_*.tmp"):
            shutil.rmtree(torn, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.folder)

    def load(self, device="cpu") -> dict | None:
        """The newest complete checkpoint as {"step", "meta", "path", "model", "optim", "rank_state"}, or None.
        "optim" is None for a finished stage's final checkpoint, whose optimizer state was pruned."""
        torn = sorted([p.name for p in self.folder.glob(".step_*.tmp")]
                      + [p.name for p in self.folder.glob("step_*") if not is_complete(p)])
        if torn:
            print0(f"warning: skipping incomplete checkpoint(s) {', '.join(sorted(torn))} (a save was interrupted)")
        candidates = self.complete()
        if not candidates:
            return None
        path = candidates[-1]
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise UserError(f"checkpoint {path} was written by {meta['world_size']} ranks but this job has "
                            f"{self.world_size}: resume with {meta['world_size']} ranks, or start a new run "
                            f"(run_name=...)")
        optim = path / f"optim_rank{self.rank}.pt"
        return {"step": meta["step"], "meta": meta, "path": path,
                "model": torch.load(path / "model.pt", map_location=device, weights_only=True),
                "optim": torch.load(optim, map_location=device, weights_only=False) if optim.is_file() else None,
                "rank_state": torch.load(path / f"state_rank{self.rank}.pt", weights_only=False)}

    def finish(self) -> None:
        """The stage is done: keep the final weights only (a d24 checkpoint with optimizer state is ~10 GB)."""
        self.wait()
        _barrier()
        if self.rank == 0:
            complete = self.complete()
            for old in complete[:-1]:
                shutil.rmtree(old, ignore_errors=True)
            if complete:
                for shard in complete[-1].glob("optim_rank*.pt"):
                    shard.unlink()
        _barrier()
