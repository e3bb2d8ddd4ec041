"""Compile caches (inductor, triton) that survive a requeue, without many ranks compiling into one shared folder.

Every rank compiles into a working cache on its node's local disk (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR
under WORKDIR_ENV, which the job script sets to one folder per user under $TMPDIR or /tmp): many ranks writing one
cache on NFS is a known crash (triton#2688), and slow. The folder's path is the same in every job, because
triton's group files hold absolute paths: a cache copied to another path misses. The profile's `compile_cache`
on shared storage (SHARED_ENV) seeds the working cache when a run of a job starts, once per node; rank 0 copies
its working cache back when the job ends or stops (before a requeue), so the next run starts warm on whichever nodes
it gets. A cache is only ever a speed-up: a failed copy leaves a cold cache, never a failed job. Outside such a
job nothing here acts.
"""

import fcntl
import os
import shutil
import time
from pathlib import Path

from nanochat.scheduler import SlurmJob

SHARED_ENV = "NANOCHAT_COMPILE_CACHE"  # the profile's compile_cache, on shared storage
WORKDIR_ENV = "NANOCHAT_COMPILE_WORKDIR"  # this job's working cache on the node's local disk
SEEDED = ".seeded-"  # + this run of the job, in the working cache: this node copied the shared cache in already


def _dirs() -> tuple[Path, Path] | None:
    shared, work = os.environ.get(SHARED_ENV), os.environ.get(WORKDIR_ENV)
    return (Path(shared), Path(work)) if shared and work else None


def seed() -> None:
    """At the start of every rank: the first rank on a node copies the shared cache in, the others wait for it
    (a lock file on the node), so no rank compiles what the last run compiled already."""
    dirs = _dirs()
    if dirs is None:
        return
    shared, work = dirs
    job = SlurmJob.from_env()
    marker = work / f"{SEEDED}{job.requeue_id}.{job.restart_count or 0}"
    try:
        work.mkdir(parents=True, exist_ok=True)
        with open(work / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not marker.exists():
                for old in work.glob(f"{SEEDED}*"):  # earlier runs' markers
                    old.unlink(missing_ok=True)
                if shared.is_dir():
                    shutil.copytree(shared, work, dirs_exist_ok=True)
                marker.touch()
    except (OSError, shutil.Error) as exc:  # e.g. the shared cache swapped by another job while copying
        print(f"compile cache: starting cold, {shared} could not be copied to {work}: {exc}", flush=True)


def publish(rank: int, budget_s: float | None = None) -> None:
    """Rank 0, when the job ends or stops: the working cache replaces the shared one. Copied beside it first, then
    swapped by two renames: a reader in between finds no cache (it compiles), never half a one. A copy that takes
    longer than `budget_s` is given up: a stop must still requeue the job within Slurm's notice."""
    dirs = _dirs()
    if dirs is None or rank != 0 or not dirs[1].is_dir():
        return
    shared, work = dirs
    fresh, stale = (shared.with_name(f"{shared.name}.{kind}-{os.getpid()}") for kind in ("new", "old"))
    deadline = time.monotonic() + budget_s if budget_s is not None else float("inf")

    def copy_in_time(src, dst):
        if time.monotonic() > deadline:
            raise OSError(f"gave up after {budget_s:.0f} s")
        return shutil.copy2(src, dst)

    try:
        shutil.copytree(work, fresh, ignore=shutil.ignore_patterns(f"{SEEDED}*", ".lock"),
                        copy_function=copy_in_time)
        if shared.exists():
            shared.rename(stale)
        fresh.rename(shared)
    except OSError as exc:  # a full quota, say: the next run compiles again, nothing is lost
        print(f"compile cache not saved to {shared}: {exc}", flush=True)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
