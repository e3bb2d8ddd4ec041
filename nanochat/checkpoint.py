"""Checkpoints: written atomically, sharded by rank, resumed exactly.

    <stage>/checkpoints/
        step_000120/            a complete checkpoint: the folder only gets this name once everything is in it
            model.pt            the model's state dict (rank 0; every rank holds the full weights)
            optim_rank{r}.pt    the optimizer state rank r holds, per parameter name and offset (nanochat.optim_state)
            state_rank{r}.pt    each rank's dataloader state (per virtual data shard) and RNG states
            manifest_rank{r}.json  size and xxh3 checksum of each file rank r wrote
            meta.json           step, counters, world size, model config; COMPLETE is written after it
        step_000100.corrupt/    one that failed verification on resume, renamed aside (never deleted)
        latest                  name of the newest complete checkpoint (for people; loading scans the folder)
        .step_000130.tmp/       a save in progress, or one a crash tore: never loaded, removed by the next save

Saving: the state is checked finite on every rank; every rank writes its files into the .tmp folder, hashing
them as they are written, and fsyncs them; the ranks agree that all writes succeeded (a full disk, a quota, an
I/O error on any rank stops every rank in one line, removes the torn folder and prunes nothing); then rank 0
writes meta.json and the COMPLETE marker, renames the folder into place, fsyncs the parent, moves `latest` and
prunes to the newest `keep`. A crash at any point leaves either the previous checkpoints or a new complete one.
With `async_save` (GPU), the state is first copied to pinned CPU memory and the files are written by a
background thread; the checkpoint is finalised at a later step boundary, once every rank's writer has finished
and all agree it succeeded.

Loading verifies each file against its manifest (each rank its own files, rank 0 the shared model.pt) and reads
with weights-only unpickling, so a file in the run folder can never run code; a checkpoint any rank rejects is
renamed aside and the next older one is used.

On another number of ranks (the ones nanochat.reshard allows): the files of old rank j are verified by new rank
j mod W (so every file is verified once, as on the same world size); every rank opens every old optimizer file
through mmap and copies out only the slices it now owns (nanochat.optim_state), and reads every old rank's state
file (a few KB each: the dataloader positions of its virtual shards, and RNG states).
"""

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from nanochat.common import UserError, atomic_write_text, fsync_dir, print0
from nanochat.distributed import agree, max_across_ranks
from nanochat.optim_state import is_per_parameter
from nanochat.reshard import check_world_size
from nanochat.storage import StorageFailure, free_bytes, save_with_digest, space_report, storage_failure, verify_file
from nanochat.watchdog import WATCHDOG

MARKER = "COMPLETE"
_STEP = re.compile(r"step_\d{6}")  # step_NNNNNN; a renamed-aside step_NNNNNN.corrupt is not a checkpoint


def is_complete(step_dir) -> bool:
    """A step_NNNNNN/ folder every rank finished writing (the marker is written last)."""
    return (Path(step_dir) / MARKER).is_file()


def complete_checkpoints(folder) -> list[Path]:
    """The complete checkpoints in a checkpoints/ folder, oldest first (torn and in-progress saves left out)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("step_*") if _STEP.fullmatch(p.name) and is_complete(p)) \
        if folder.is_dir() else []


def latest_meta(folder) -> dict:
    """meta.json of the newest complete checkpoint in a checkpoints/ folder; {} when there is none."""
    complete = complete_checkpoints(folder)
    return json.loads((complete[-1] / "meta.json").read_text()) if complete else {}


def load_optimizer_state(step_dir, rank: int, world_size: int) -> tuple[list | None, str]:
    """The optimizer state of a complete checkpoint for a warm start in another stage, as optim_state.restore
    takes it (this rank verifies the files of the old ranks it is assigned, see the module docstring; the caller
    agrees with the others that all are good); else None and why not, in words (no optimizer state kept, an older
    checkpoint from another number of ranks, damaged)."""
    step_dir = Path(step_dir)
    try:
        meta = json.loads((step_dir / "meta.json").read_text())
        written_by = meta["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, "it is not one of this harness's sharded checkpoints"
    if not (step_dir / "optim_rank0.pt").is_file():
        return None, "it keeps no optimizer state"
    problem = _verify_ranks(step_dir, meta, range(rank, written_by, world_size), only="optim_rank")
    if problem:
        return None, problem
    try:
        sources = _optimizer_sources(step_dir, rank, world_size, written_by)
    except _Unreadable as exc:
        return None, str(exc)
    if written_by != world_size and not is_per_parameter(sources[0]):
        return None, f"it was written by {written_by} ranks with an earlier version and this job has {world_size}"
    return sources, ""


def _own_first(rank: int, written_by: int) -> list[int]:
    """The old ranks in the order a new rank prefers their copies of replicated state: its own number first."""
    return [rank] + [j for j in range(written_by) if j != rank] if rank < written_by else list(range(written_by))


def _optimizer_sources(step_dir: Path, rank: int, world_size: int, written_by: int) -> list:
    """The saved optimizer dicts a rank reads: its own old file on the same world size (it holds everything the
    rank owns), else every old rank's, own first. Through mmap: only the bytes restore copies are read."""
    readers = [rank] if written_by == world_size else _own_first(rank, written_by)
    return [_load_named(step_dir / f"optim_rank{j}.pt", "cpu", mmap=True) for j in readers]


def _verify_ranks(step_dir: Path, meta: dict, old_ranks, only: str = "") -> str | None:
    """Why the files of these old ranks (those whose names start with `only`) do not match the manifests their
    writers left, or None when they do."""
    for j in old_ranks:
        manifest_path = step_dir / f"manifest_rank{j}.json"
        try:
            manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        except (OSError, ValueError) as exc:
            return f"{manifest_path.name}: {type(exc).__name__}"
        if manifest is None and meta.get("manifests"):
            return f"{manifest_path.name}: missing"
        # written before manifests existed: such a checkpoint is only as good as its files load
        for name, expected in (manifest or {}).items():
            problem = verify_file(step_dir / name, expected) if name.startswith(only) else None
            if problem:
                return f"{name}: {problem}"
    return None


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
    """Every generator's state as tensors and plain values (what a weights-only load reads back)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # keys: a tensor, or a numpy array in checkpoints from before
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    return not agree(not done)[0]


def _first_bad_rank(bad: bool, rank: int) -> int | None:
    """Collective: the lowest rank that reported a problem, or None when none did."""
    (worst,) = max_across_ranks(-rank if bad else -(1 << 30))
    return None if worst == -(1 << 30) else -worst


def _all_finite(states: list) -> bool:
    """Whether every floating tensor in these nested states is finite (one host sync for all of them)."""
    checks = [torch.isfinite(t).all() for t in _tensors(states) if t.is_floating_point() and t.numel()]
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all()) if checks else True


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _load(path: Path, device, mmap: bool = False) -> object:
    """torch.load that runs no code from the file; numpy's array reconstruction is admitted for the RNG state
    of checkpoints written before the RNG state was kept as tensors. mmap=True (CPU only) maps the tensors'
    bytes instead of reading them: they are read when used."""
    with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)


class _Unreadable(Exception):
    """A checkpoint file that would not load: its name and why, in one line."""


def _load_named(path: Path, device, mmap: bool = False) -> object:
    try:
        return _load(path, device, mmap)
    except pickle.UnpicklingError:
        raise _Unreadable(f"{path.name}: refused by the weights-only loader (damaged, or a pickle that would run "
                          f"code)") from None
    except Exception as exc:  # noqa: BLE001  a damaged file fails in many ways; each is one line
        raise _Unreadable(f"{path.name}: cannot be loaded ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                        getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


class CheckpointManager:
    def __init__(self, folder, rank: int = 0, world_size: int = 1, keep: int = 2, async_save: bool = False):
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.keep, self.async_save = max(2, keep), async_save
        self._pending: dict | None = None  # an async save whose files are being written

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, step: int, model_state: dict | None, optim_state: dict, rank_state: dict, meta: dict) -> None:
        """Collective: every rank calls it at the same step. model_state is only needed on rank 0. Raises
        StorageFailure (every rank) when a rank could not write, and UserError when the state is not finite:
        either way nothing is marked complete and nothing older is pruned."""
        self.wait()  # at most one save in flight
        tmp = self.folder / f".step_{step:06d}.tmp"
        files = {f"optim_rank{self.rank}.pt": optim_state, f"state_rank{self.rank}.pt": rank_state}
        if self.rank == 0:
            files["model.pt"] = model_state
        bad = _first_bad_rank(not _all_finite(list(files.values())), self.rank)
        if bad is not None:
            last = self.complete()
            raise UserError(f"step {step}: rank {bad}'s weights or optimizer state are not finite (nan/inf), so "
                            f"they were not saved; the last good checkpoint is "
                            f"{last[-1] if last else 'none (no checkpoint was saved yet)'}")
        if self.rank == 0:
            self._say_if_short_of_space(step)
        # serialised now: an async save writes it steps later, when the caller's counters have moved on (the
        # async path used to record the counters of the step it was finalised at, and resumed a step late)
        meta = json.dumps({**meta, "step": step, "world_size": self.world_size, "manifests": True}, indent=2,
                          default=str)
        if not self.async_save:
            WATCHDOG.beat(slow=f"writing checkpoint step {step}")
            error = self._write(step, tmp, files)
            # Waiting for the peers' writes is under the step timeout again: a peer frozen in its write (SIGSTOP,
            # a dead node) looks exactly like that wait, and must not hold the job for the start-up timeout
            WATCHDOG.beat()
            self._finalize(step, tmp, meta, error)
            return
        files = _to_cpu(files, pin=torch.cuda.is_available())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned copies must land before the writer reads them
        pending = {"step": step, "tmp": tmp, "meta": meta, "error": None}
        pending["writer"] = threading.Thread(target=lambda: pending.update(error=self._write(step, tmp, files)),
                                             daemon=True, name="checkpoint-writer")
        pending["writer"].start()
        self._pending = pending

    def _write(self, step: int, tmp: Path, files: dict) -> StorageFailure | None:
        """This rank's files and their manifest (size and checksum of each); the failure, kept, not raised, so
        that every rank learns of it before anything is finalised."""
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            manifest = {name: save_with_digest(obj, tmp / name) for name, obj in files.items()}
            _inject_test_fault(step, self.rank)
            atomic_write_text(tmp / f"manifest_rank{self.rank}.json", json.dumps(manifest, indent=1))
        except OSError as exc:
            return storage_failure(exc, f"checkpoint step {step} (rank {self.rank})", tmp, _nbytes(files))
        except Exception as exc:  # noqa: BLE001  whatever stops a writer must reach the agreement, not kill a thread
            return StorageFailure(f"checkpoint step {step} (rank {self.rank}) failed: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}; the previous checkpoints "
                                  f"are intact")
        pause = float(os.environ.get("NANOCHAT_TEST_CKPT_PAUSE_S", "0"))  # lets the tests kill a save midway
        if pause:
            time.sleep(pause)
        return None

    def _say_if_short_of_space(self, step: int) -> None:
        """Before a save, one line when the last checkpoint would not fit in the free space: said before the save
        can fail, which loses nothing (older checkpoints are kept until a new one is complete)."""
        last = self.complete()
        if not last:
            return
        size = sum(f.stat().st_size for f in last[-1].iterdir() if f.is_file())
        if free_bytes(self.folder) < size:
            print0(f"warning: checkpoint step {step} may not fit: {space_report(self.folder)}, and the last "
                   f"checkpoint took {size / 2**30:.2f} GiB")

    def poll(self) -> None:
        """At a step boundary: finalise a pending async save if every rank's writer is done (one tiny
        all-reduce while a save is pending, nothing otherwise)."""
        if self._pending is not None and _all_done(not self._pending["writer"].is_alive()):
            self._finish_pending()

    def wait(self) -> None:
        """Block until a pending async save is complete (before the next save and at the end of a stage)."""
        if self._pending is not None:
            WATCHDOG.beat(slow=f"writing checkpoint step {self._pending['step']}")
            self._pending["writer"].join()
            WATCHDOG.beat()  # the peers' writes: step timeout (see save)
            _all_done(True)  # keeps the ranks' collective calls matched with poll()
            self._finish_pending()

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        self._finalize(pending["step"], pending["tmp"], pending["meta"], pending["error"])

    def _finalize(self, step: int, tmp: Path, meta: str, error: StorageFailure | None) -> None:
        """Collective. Every rank's files are written, fsynced and listed in its manifest, or some rank failed:
        then the torn folder goes and every rank raises, before any marker is written or anything pruned."""
        bad = _first_bad_rank(error is not None, self.rank)  # also the barrier after every rank's writes
        if bad is not None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            raise error or StorageFailure(f"checkpoint step {step} failed on rank {bad} (its line says why); "
                                          f"the previous checkpoints are intact")
        if self.rank == 0:
            final = self.folder / f"step_{step:06d}"
            try:
                (tmp / "meta.json").write_text(meta)
                (tmp / MARKER).write_text("")
                fsync_dir(tmp)
                if final.exists():  # a complete copy of the same step (saved again after a resume): replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.folder)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = storage_failure(exc, f"checkpoint step {step}", tmp)
        bad = _first_bad_rank(error is not None, self.rank)  # rank 0's outcome, before anyone waits on it
        if bad is not None:
            raise error or StorageFailure(f"checkpoint step {step} failed on rank {bad} (its line says why); "
                                          f"the previous checkpoints are intact")
        if self.rank == 0:
            try:  # the checkpoint is complete and safe; the pointer for people and the pruning can wait
                atomic_write_text(self.folder / "latest", final.name + "\n")
                self._prune()
            except OSError as exc:
                print0(f"warning: after saving {final.name}: {exc}")
        _barrier()

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints: each was verified by every rank before its marker was
        written, and the newest is never removed (keep >= 2). Renamed-aside corrupt ones are left for a person."""
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for torn in self.folder.glob(".step_*.tmp"):
            shutil.rmtree(torn, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.folder)

    def load(self, device="cpu") -> dict | None:
        """The newest complete checkpoint that every rank verifies, as {"step", "meta", "path", "model", "optim",
        "rank_state"}, or None. One that fails is renamed aside to step_NNNNNN.corrupt with one line saying
        which file and why, and the next older one is tried. "optim" is None for a finished stage's final
        checkpoint whose optimizer state was pruned."""
        torn = sorted([p.name for p in self.folder.glob(".step_*.tmp")]
                      + [p.name for p in self.folder.glob("step_*") if _STEP.fullmatch(p.name) and not is_complete(p)])
        if torn:
            print0(f"warning: skipping incomplete checkpoint(s) {', '.join(sorted(torn))} (a save was interrupted)")
        for path in reversed(self.complete()):
            loaded, problem = self._read(path, device)
            bad = _first_bad_rank(problem is not None, self.rank)
            if bad is None:
                return loaded
            if problem:
                print(f"warning: checkpoint {path} is damaged: {problem}; renamed to {path.name}.corrupt, trying "
                      f"an older one", flush=True)
            _barrier()
            if self.rank == 0:
                aside = path.with_name(path.name + ".corrupt")
                try:  # a step damaged twice keeps both copies
                    os.replace(path, aside if not aside.exists() else aside.with_name(f"{aside.name}.{time.time():.0f}"))
                except OSError as exc:
                    print0(f"warning: could not rename {path} aside ({exc}); it is skipped")
            _barrier()
        return None

    def _read(self, path: Path, device) -> tuple[dict | None, str | None]:
        """This rank's part of a checkpoint, verified against the manifests its writers left (see the module
        docstring for who verifies what), or why it cannot be used. "written_by" is the world size that wrote
        it; "rank_states" every old rank's state, in rank order, when that differs from this job's."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            written_by = meta["world_size"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"meta.json: {type(exc).__name__}: {exc}"
        check_world_size(meta, self.world_size, f"checkpoint {path}")
        problem = _verify_ranks(path, meta, range(self.rank, written_by, self.world_size))
        if problem:
            return None, problem
        resharded = written_by != self.world_size
        loaded = {"step": meta["step"], "meta": meta, "path": path, "optim": None, "written_by": written_by}
        try:
            loaded["model"] = _load_named(path / "model.pt", device)
            if (path / "optim_rank0.pt").is_file():  # a finished stage's final checkpoint keeps no optimizer state
                loaded["optim"] = _optimizer_sources(path, self.rank, self.world_size, written_by)
            states = [_load_named(path / f"state_rank{j}.pt", "cpu")
                      for j in (range(written_by) if resharded else [self.rank])]
        except _Unreadable as exc:
            return None, str(exc)
        loaded["rank_state"] = states[0]  # on a reshard, old rank 0's: its RNG and loss scale are every rank's
        if resharded:
            loaded["rank_states"] = states
        return loaded, None

    def finish(self, keep_optimizer: bool = False) -> None:
        """The stage is done: keep the final checkpoint only, and its optimizer shards only when asked (pretraining
        keeps them for fine-tuning's warm start; a d24 checkpoint with optimizer state is ~10 GB)."""
        self.wait()
        _barrier()
        if self.rank == 0:
            complete = self.complete()
            for old in complete[:-1]:
                shutil.rmtree(old, ignore_errors=True)
            if complete and not keep_optimizer:  # manifests first: a kill in between leaves listed files that all exist
                for manifest_path in complete[-1].glob("manifest_rank*.json"):
                    manifest = json.loads(manifest_path.read_text())
                    atomic_write_text(manifest_path, json.dumps(
                        {k: v for k, v in manifest.items() if not k.startswith("optim_rank")}, indent=1))
                for shard in complete[-1].glob("optim_rank*.pt"):
                    shard.unlink()
        _barrier()


def _inject_test_fault(step: int, rank: int) -> None:
    """NANOCHAT_TEST_SAVE_ERRNO=ERRNO:STEP[@RANK]: the tests' way to make the save at STEP fail as a full quota
    (EDQUOT) or an I/O error (EIO) would, on one rank or on all, after its files were written."""
    spec = os.environ.get("NANOCHAT_TEST_SAVE_ERRNO")
    if spec:
        code, _, where = spec.partition(":")
        at_step, _, only = where.partition("@")
        if int(at_step) == step and (not only or int(only) == rank):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
