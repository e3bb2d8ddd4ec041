"""Files on cluster storage (torch-free at import, for the launcher): written with a checksum, verified when read,
and a full disk or quota said in one line.

Shared filesystems (Lustre, GPFS, NFS homes) fail a write with EDQUOT when a quota is full while statvfs still
shows free space, so a quota is treated like a full disk (ENOSPC), and a line about free space says when the
filesystem is one whose quotas statvfs cannot see.
"""

import errno
import os
from pathlib import Path

import xxhash

from nanochat.common import UserError

NETWORK_FILESYSTEMS = {"lustre", "gpfs", "nfs", "nfs4", "beegfs", "cifs", "smb3", "cephfs", "ceph", "fuse.sshfs",
                       "panfs", "wekafs"}
OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}
# a checksum against damage, not an adversary (a writer of the run folder could rewrite the manifest too): xxh3 at
# 7.1 GiB/s on one core here, where hashlib's blake2b does 0.69 (a d20 checkpoint: ~1.3 s instead of ~13 s)
HASH = "xxh3_128"
CHUNK = 8 << 20


class StorageFailure(UserError):
    """A write the filesystem refused. Not requeued: a full disk or quota does not heal itself."""


class _HashingWriter:
    """A binary file that hashes what goes through it, so a checksum costs no second read."""

    def __init__(self, f):
        self.f, self.digest, self.size, self.error = f, xxhash.xxh3_128(), 0, None

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_with_digest(obj, path: Path) -> dict:
    """torch.save `obj` to `path`, fsynced; returns {"size", HASH} of the bytes written."""
    import torch

    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:  # torch's zip writer reports a failed write as "unexpected pos": say the real cause
            if writer.error is None:
                raise
            raise writer.error from None
        f.flush()
        os.fsync(f.fileno())
    return {"size": writer.size, HASH: writer.digest.hexdigest()}


def file_digest(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, expected: dict) -> str | None:
    """Why `path` does not match its manifest entry, or None when it does."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{size:,} bytes where {expected['size']:,} were written"
    if file_digest(path) != expected[HASH]:
        return f"its {HASH} checksum differs from the one written (the bytes changed)"
    return None


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding `path`, from /proc/mounts; ("?", "?") where that cannot be read."""
    path = Path(path).resolve()
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?", "?"
    holding = [(mount.replace("\\040", " "), kind) for mount, kind in mounts
               if path == Path(mount) or Path(mount) in path.parents]
    return max(holding, key=lambda m: len(m[0])) if holding else ("?", "?")


def free_bytes(path: Path) -> int:
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def space_report(path: Path) -> str:
    """'/scratch (lustre): 1.20 GiB free, as statvfs sees it; quotas are not visible here'."""
    mount, fs_type = mount_of(path)
    quota = "; quotas are not visible here" if fs_type in NETWORK_FILESYSTEMS else ""
    return f"{mount} ({fs_type}): {gib(free_bytes(path))} free{quota}"


def storage_failure(exc: OSError, what: str, path: Path, needed: int | None = None) -> StorageFailure:
    """One line for a write that failed: which filesystem, how much is free, how much was needed."""
    reason = "disk quota exceeded" if exc.errno == errno.EDQUOT else os.strerror(exc.errno) if exc.errno else str(exc)
    need = f"; it needs about {gib(needed)}" if needed else ""
    advice = "free space or raise the quota, then run the same command again" if exc.errno in OUT_OF_SPACE \
        else "check the filesystem, then run the same command again"
    return StorageFailure(f"{what} failed: {reason} on {space_report(path)}{need}; {advice}")
