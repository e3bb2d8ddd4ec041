"""Small shared helpers: the base folder, the user-error type, rank info, atomic file writes."""

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad value, missing input): printed as one line, exit code 2."""


SCRATCH_ENV = "NANOCHAT_SCRATCH"  # a site's shared scratch, set once (e.g. in ~/.bashrc): data and runs go there


def get_base_dir() -> Path:
    """Shared, read-mostly assets (data shards, eval bundle) and, under runs/, the runs: $NANOCHAT_BASE_DIR, else
    $NANOCHAT_SCRATCH/nanochat, else ~/.cache/nanochat."""
    scratch = os.environ.get(SCRATCH_ENV)
    base = os.environ.get("NANOCHAT_BASE_DIR") or (os.path.join(scratch, "nanochat") if scratch else None) \
        or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    path = Path(os.path.expandvars(base))  # a profile's "$SCRATCH/nanochat", as the job's shell expands it
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size), from the process group when there is one, else from the environment."""
    if "torch" in sys.modules:  # no process group without torch; importing it would cost the login node seconds
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def print0(*args, **kwargs):
    if get_dist_info()[0] == 0:
        print(*args, **kwargs, flush=True)


@contextmanager
def atomic_file(path):
    """Yield a binary file beside `path`; on success it is fsynced and renamed over `path`, so readers (and a
    crash) see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; run folders on shared storage are read by colleagues and tools
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_dir(path) -> None:
    """Make a rename in `path` durable (a crash right after os.replace could otherwise lose it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_cli(body) -> int:
    """A command line's exit code: 0 when `body()` returns; a UserError is one line and 2; Ctrl-C says how to
    carry on (130)."""
    try:
        body()
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
