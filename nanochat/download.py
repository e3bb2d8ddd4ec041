"""HTTP downloads that survive flaky networks and fail fast on offline nodes.

One file: stream to DEST.part, resume a leftover .part with a Range request, check the length, the checksum
and an optional validator, then fsync and rename, so DEST never exists half-written. Transient failures
(5xx, 429, resets, truncated bodies, read timeouts) are retried with exponential backoff; anything a retry
cannot fix (404, 403, a bad certificate) fails at once; and a node without network (no DNS, refused,
unreachable) fails at once with NoNetworkError, because compute nodes on clusters are often offline and
five rounds of backoff would only hide that. No dataset knowledge lives here: callers pass URLs and checks.
`retrying` is that policy on its own, for other transports (nanochat.hub), and `download_many` runs any job
with a `dest` and a `fetch(**options)` in parallel.
"""

import errno
import hashlib
import http.client
import os
import random
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlsplit

from nanochat.common import UserError, fsync_dir
from nanochat.progress import Progress

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 1 << 20
MAX_SLEEP_S = 60.0
_OFFLINE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ECONNREFUSED}
T = TypeVar("T")


class DownloadError(UserError):
    """A download that failed for good: one line with the URL, the reason and the attempts."""


class NoNetworkError(UserError):
    """The host cannot be reached at all (no DNS, refused, no route): this node is offline."""


class Transient(Exception):
    """This attempt failed in a way a retry may fix; `retry_after` is the server's hint in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class Permanent(Exception):
    """This attempt failed in a way no retry can fix (404, 403, bad certificate, disk error)."""


class Unreachable(Exception):
    """Connecting failed before any byte was exchanged: DNS, refused, unreachable, connect timeout."""


@dataclass(frozen=True)
class DownloadJob:
    url: str
    dest: Path
    checksum: str | None = None  # sha256, or git's blob id (see checksum_of)
    validate: Callable[[Path], object] | None = None  # raises (or returns False) on a bad file

    def fetch(self, **options) -> Path:
        return download_file(self.url, self.dest, checksum=self.checksum, validate=self.validate, **options)


def download_file(url: str, dest, *, checksum: str | None = None, validate=None, retries: int = 5,
                  backoff_s: float = 1.0, timeout_s: float = 30, hint: str | None = None,
                  cancel: threading.Event | None = None, log: Callable[[str], None] | None = None,
                  on_body: Callable[[int | None], None] | None = None,
                  on_chunk: Callable[[int], None] | None = None) -> Path:
    """Download `url` to `dest` (skipped when `dest` exists); return `dest`. See the module docstring.
    `on_body(n)` is told at each response how many bytes its body announces (None: not said), `on_chunk(n)` of
    each chunk written."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    def attempt() -> Path:
        _fetch(url, part, timeout_s, cancel, on_body, on_chunk)
        _verify(part, checksum, validate)
        os.replace(part, dest)
        fsync_dir(dest.parent)
        return dest

    return retrying(attempt, url, dest.name, retries=retries, backoff_s=backoff_s, hint=hint, cancel=cancel,
                    log=log)


def retrying(attempt: Callable[[], T], url: str, name: str, *, retries: int = 5, backoff_s: float = 1.0,
             hint: str | None = None, cancel: threading.Event | None = None,
             log: Callable[[str], None] | None = None) -> T:
    """`attempt()` until it returns, as the module docstring says: it raises Transient (retried with backoff),
    Permanent (a DownloadError at once) or Unreachable (NoNetworkError on the first attempt). `url` and `name`
    are what the messages show."""
    attempts = max(1, retries + 1)
    for n in range(1, attempts + 1):
        if cancel is not None and cancel.is_set():
            raise DownloadError(f"download cancelled: {url}")
        try:
            return attempt()
        except Permanent as e:
            raise DownloadError(f"download failed: {url}: {_line(e)} (not retried)") from None
        except Unreachable as e:
            # Only on the first attempt: once the server has answered, a refused connection is a server
            # restart or an overloaded balancer, which a retry can fix.
            if n == 1:
                raise NoNetworkError(_offline_message(url, e, hint)) from None
            reason, retry_after = _line(e), None
        except Transient as e:
            reason, retry_after = _line(e), e.retry_after
        if n < attempts:
            delay = min(MAX_SLEEP_S, backoff_s * 2 ** (n - 1)) * (1 + 0.25 * random.random())
            if retry_after is not None:  # 429/503 often say how long to wait; honour it, within reason
                delay = max(delay, min(retry_after, MAX_SLEEP_S))
            if log is not None:
                log(f"retry {n}/{retries} {name}: {reason}; waiting {delay:.1f}s")
            if cancel is not None:
                cancel.wait(delay)
            else:
                time.sleep(delay)
    raise DownloadError(f"download failed: {url}: {reason} (after {attempts} attempts)")


def download_many(jobs, workers: int = 8, *, retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 30,
                  hint: str | None = None, log: Callable[[str], None] | None = None) -> list[Path]:
    """Download `jobs` (DownloadJob, nanochat.hub.HubJob) in parallel threads (I/O bound); return their paths in
    job order.

    The first failure (an offline node, above all) cancels the rest: queued jobs never start, running ones
    stop at their next chunk and keep their .part for a later resume; then that first error is raised.
    One line per file downloaded goes to `log` (default: stdout), beside a progress bar of the bytes.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    log = log or (lambda msg: print(msg, flush=True))
    cancel = threading.Event()
    progress = Progress(None, "download", scale=(1e6, "MB"))
    transfer = _Transfer(progress, len(jobs))

    def say(msg: str) -> None:
        with progress.aside():
            log(msg)

    first_error: list[BaseException] = []  # the real cause, not a "cancelled" that raced it to the queue
    lock = threading.Lock()

    def one(i: int, job: DownloadJob):
        t0 = time.monotonic()
        existed = job.dest.exists()
        try:
            path = job.fetch(retries=retries, backoff_s=backoff_s, timeout_s=timeout_s, hint=hint, cancel=cancel,
                             log=say, on_body=lambda n: transfer.announced(i, n),
                             on_chunk=lambda n: transfer.received(i, n))
        except BaseException as e:
            with lock:
                first_error.append(e)
            cancel.set()  # here, not in the caller: this worker would otherwise pick up the next job first
            raise
        transfer.finished(i)
        return path, existed, time.monotonic() - t0

    results: list[Path | None] = [None] * len(jobs)
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))), thread_name_prefix="download")
    futures = {pool.submit(one, i, job): i for i, job in enumerate(jobs)}
    done = 0
    try:
        for fut in as_completed(futures):
            path, existed, secs = fut.result()  # re-raises the job's error in this thread
            results[futures[fut]] = path
            done += 1
            if not existed:
                say(f"[{done}/{len(jobs)}] {path.name} {path.stat().st_size / 1e6:.1f} MB in {secs:.1f}s")
    except BaseException as e:  # also Ctrl-C: stop the workers before waiting for them
        cancel.set()
        if first_error and not isinstance(e, KeyboardInterrupt):
            raise first_error[0] from None
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return results


class _Transfer:
    """The bytes download_many fetches, for its progress bar. The total is what the responses announced, plus
    their mean for each file with no response yet (the files of one batch are about the same size), so there is
    an ETA from the first response on, not only once the last file has started."""

    def __init__(self, progress: Progress, files: int):
        self.progress, self.files = progress, files
        self.fetched: dict[int, int] = {}  # job -> bytes received, over all its attempts
        self.expected: dict[int, int] = {}  # job -> bytes it will have received in all, as last announced
        self.lock = threading.Lock()

    def announced(self, job: int, length: int | None) -> None:
        """A response for `job` began; its body is `length` bytes (a resumed one: the rest)."""
        if length is not None:
            self._expect(job, self.fetched.get(job, 0) + length)

    def received(self, job: int, nbytes: int) -> None:
        with self.lock:
            self.fetched[job] = self.fetched.get(job, 0) + nbytes
        self.progress.advance(nbytes)

    def finished(self, job: int) -> None:
        """`job` is done: it took what it fetched (nothing, for a file already there)."""
        self._expect(job, self.fetched.get(job, 0))

    def _expect(self, job: int, nbytes: int) -> None:
        with self.lock:
            self.expected[job] = nbytes
            known = self.expected.values()
            self.progress.total = sum(known) * self.files / len(known)


# ----------------------------------------------------------------------------------------------------------
# One attempt


def _fetch(url: str, part: Path, timeout_s: float, cancel, on_body=None, on_chunk=None) -> None:
    """Bring `part` to the full body, resuming what is there; raise Transient/Permanent/Unreachable."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "nanochat-slurm"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # our .part is already whole (killed before the rename) or too long
            total = _content_range(e.headers.get("Content-Range", ""))[1]
            if total == have:
                return
            part.unlink(missing_ok=True)
            raise Transient("HTTP 416 for a resume; restarting from byte 0")
        if e.code in TRANSIENT_STATUS:
            raise Transient(f"HTTP {e.code} {e.reason}", _retry_after(e.headers))
        raise Permanent(f"HTTP {e.code} {e.reason}")
    except urllib.error.URLError as e:  # urlopen wraps errors of the connect phase in URLError
        reason = e.reason
        if isinstance(reason, ssl.SSLCertVerificationError) or not isinstance(reason, OSError):
            raise Permanent(str(reason))
        if isinstance(reason, (socket.gaierror, TimeoutError)) or reason.errno in _OFFLINE_ERRNOS:
            raise Unreachable(reason.strerror or str(reason) or type(reason).__name__)
        raise Transient(f"connection failed: {reason}")
    except (http.client.HTTPException, OSError) as e:  # e.g. the server hung up before the status line
        raise Transient(f"no response: {e or type(e).__name__}")

    with resp:
        length = resp.headers.get("Content-Length")
        if on_body is not None:
            on_body(int(length) if length and length.isdigit() else None)
        if have and resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                part.unlink(missing_ok=True)
                raise Transient(f"server resumed at byte {start}, not {have}; restarting")
            mode = "ab"
        else:  # a whole body: we sent no Range, or the server ignored it; start over
            have, mode = 0, "wb"
            total = int(length) if length and length.isdigit() else None
        try:
            f = open(part, mode)
        except OSError as e:
            raise Permanent(f"cannot write {part}: {e.strerror}")
        with f:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Permanent("cancelled")
                try:
                    chunk = resp.read1(CHUNK_BYTES)  # what has arrived: a stall loses nothing already read
                except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
                    raise Transient(f"transfer broke after {have} bytes: {e or type(e).__name__}")
                except OSError as e:
                    raise Transient(f"transfer broke after {have} bytes: {e}")
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:  # disk full, quota: no retry helps
                    raise Permanent(f"cannot write {part}: {e.strerror}")
                have += len(chunk)
                if on_chunk is not None:
                    on_chunk(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and have < total:  # http.client returns b"" on an early EOF, without raising
        raise Transient(f"truncated body: {have} of {total} bytes")
    if total is not None and have > total:
        part.unlink(missing_ok=True)
        raise Transient(f"body longer than announced: {have} of {total} bytes")


def checksum_of(path, like: str) -> str:
    """The checksum of the file at `path` of the kind `like` is: sha256 for 64 hex digits, git's blob id (sha1 of
    "blob <size>\\0" + bytes, what git and the hub's ETag of a non-LFS file give) for 40."""
    if len(like) == 64:
        h = hashlib.sha256()
    elif len(like) == 40:
        h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    else:
        raise ValueError(f"not a sha256 or a git blob id: {like!r}")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def checksum_mismatch(path, want: str) -> str | None:
    """None when the file has checksum `want`; else the line that says what differs."""
    got = checksum_of(path, want)
    kind = "sha256" if len(want) == 64 else "git blob id"
    return None if got == want.lower() else f"{kind} mismatch: got {got[:16]}..., want {want[:16]}..."


def _verify(part: Path, checksum: str | None, validate) -> None:
    """Check a complete body; a bad one is deleted (resuming it would only keep the damage)."""
    if checksum:
        mismatch = checksum_mismatch(part, checksum)
        if mismatch:
            part.unlink(missing_ok=True)
            raise Transient(mismatch)
    if validate is not None:
        try:
            ok = validate(part)
        except Exception as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "validator said no"
        if ok is False:
            part.unlink(missing_ok=True)
            raise Transient(f"invalid file ({why})")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); '*' totals -> None."""
    try:
        spec, _, total = value.split(" ", 1)[1].partition("/")
        start = int(spec.split("-")[0]) if spec != "*" else None
        return start, (int(total) if total.isdigit() else None)
    except (IndexError, ValueError):
        return None, None


def _retry_after(headers) -> float | None:
    value = (headers or {}).get("Retry-After", "")
    return float(value) if value.strip().isdigit() else None


def _line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _offline_message(url: str, e: Exception, hint: str | None) -> str:
    host = urlsplit(url).netloc or url
    how = f"stage assets on a login node with: {hint}" if hint else "download them on a machine with network access"
    return f"cannot reach {host} ({_line(e)}): this node looks offline; {how}"

