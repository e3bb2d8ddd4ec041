"""One writer per run folder: the lease a process holds while it trains or evaluates in a run (`Run.lease_path`).

    <run>/lease.json  {"owner": "job 1234_5" | "host:pid", "job_id", "host", "pid", "pid_start", "token",
                       "acquired", "heartbeat", "argv"}   written atomically, under <run>/.lease.lock

The owner is the Slurm job (`SlurmJob.requeue_id`: ARRAYJOB_TASK for an array element), else host+pid. The same
job, after a requeue or a node-failure restart, takes its own lease back; anyone else refuses at once, in one line
naming the holder and how to stop it (UserError, exit 2), unless the holder is gone:
    - a local holder on this host whose process is dead (or whose pid now belongs to another process);
    - a Slurm holder whose job squeue no longer lists as pending or running (when squeue cannot answer, the
      holder counts as alive: refusing is safe, two writers are not);
    - any other holder whose heartbeat is older than STALE_S (a frozen process, a holder on another host, a job
      holder when squeue cannot answer; when it answers, it wins: a suspended job sends no heartbeat).
Such a lease is taken over with a line that says so. The heartbeat comes from a daemon thread every HEARTBEAT_S,
so a long evaluation, a save or a slow step never looks stale; STALE_S is longer than the process group's
collective timeout, the longest a healthy step can block.

Only rank 0 holds it; a launcher that spawns local ranks holds it for them and gives them its token
(`child_env`), with which they trust the lease instead of refusing it. A SIGKILLed holder leaves the file behind:
the dead-pid rule (or the heartbeat) lets the next launch take it over.

Torch-free, like nanochat.runs and nanochat.scheduler (the login node checks leases before submitting).
"""

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from nanochat import scheduler
from nanochat.common import UserError, atomic_write_json
from nanochat.scheduler import SlurmJob

HEARTBEAT_S = 30.0
# longer than any step can block: the process group's collective timeout (NANOCHAT_PG_TIMEOUT_S, 600 s default)
STALE_S = max(900.0, 1.5 * float(os.environ.get("NANOCHAT_PG_TIMEOUT_S", "600")))
TOKEN_ENV = "NANOCHAT_LEASE_TOKEN"  # given by a lease holder to the local ranks it spawns


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_owner() -> dict:
    job = SlurmJob.from_env().requeue_id
    host, pid = socket.gethostname(), os.getpid()
    return {"owner": f"job {job}" if job else f"{host}:{pid}", "job_id": job, "host": host, "pid": pid,
            "pid_start": _pid_start(pid)}


def read(path) -> dict | None:
    """The lease in `path`, None when there is none (an unreadable file counts as none: it is written atomically,
    so only a hand-made one can be torn)."""
    try:
        lease = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def _alive_here(lease: dict) -> bool:
    """The holder is a live process on this host (the same pid, not a reused one)."""
    if lease.get("host") != socket.gethostname() or not lease.get("pid"):
        return False
    pid = int(lease["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return not (lease.get("pid_start") and _pid_start(pid) not in (None, lease["pid_start"]))


def same_owner(lease: dict, me: dict) -> bool:
    """The lease is this process's own: the same Slurm job (after a requeue or a restart on another node: its old
    process is gone), unless a live other process of that job on this host holds it (two launches in one salloc
    shell); outside Slurm, the same host and pid."""
    if lease.get("job_id") or me["job_id"]:
        return lease.get("job_id") == me["job_id"] and (lease.get("pid") == me["pid"] or not _alive_here(lease))
    return (lease.get("host"), lease.get("pid")) == (me["host"], me["pid"])


def gone(lease: dict, now: float | None = None, queued: dict | None = None) -> str | None:
    """Why the holder of `lease` is gone (the takeover line's reason); None while it may still be writing.
    `queued`: squeue's answer for the holder's job, if the caller has it."""
    job = lease.get("job_id")
    if job:  # squeue's answer wins over the heartbeat: a suspended job sends none, yet it will write again
        states = queued if queued is not None else scheduler.queued_jobs(ids=[job], timeout=30)
        if states is not None:
            return None if scheduler.is_active(states.get(job)) else f"job {job} is no longer queued or running"
    elif lease.get("host") == socket.gethostname() and lease.get("pid") and not _alive_here(lease):
        return f"process {lease['pid']} is dead"
    age = (now or time.time()) - float(lease.get("heartbeat") or 0)
    if age > STALE_S:
        return f"its last heartbeat is {age / 60:.0f} min old (limit {STALE_S / 60:.0f} min)"
    return None


def holder_line(lease: dict, run_name: str, path, more_jobs: list[str] = ()) -> str:
    """One line: who holds the run and how to stop it (with `more_jobs`, the run's other queued jobs)."""
    age = time.time() - float(lease.get("heartbeat") or 0)
    job = lease.get("job_id")
    if job:
        who, stop = f"Slurm job {job}", f"scancel {' '.join([job, *[j for j in more_jobs if j != job]])}"
    elif lease.get("host") == socket.gethostname():
        who, stop = f"process {lease.get('pid')} on this host ({lease.get('host')})", f"kill {lease.get('pid')}"
    else:
        who, stop = f"process {lease.get('pid')} on {lease.get('host')}", f"ssh {lease.get('host')} kill {lease.get('pid')}"
    return (f"run {run_name} is in use by {who} (its lease {path}, heartbeat {age:.0f} s ago); wait for it to "
            f"end, or stop it: {stop}")


def check_free(run) -> None:
    """Before submitting a job for a run (a nanochat.runs.Run): a UserError, in one line, when a live holder has
    its lease or a job submitted for it (slurm/jobs.jsonl) is still queued or running; also when squeue cannot
    tell (submitting a second writer is worse than submitting nothing)."""
    name, held = run.root.name, read(run.lease_path)
    jobs = [j["job_id"] for j in run.jobs()]
    ids = jobs + ([held["job_id"]] if held and held.get("job_id") else [])
    queued = scheduler.queued_jobs(ids=ids) if ids else {}
    if queued is None:
        raise UserError(f"squeue did not answer, so whether run {name}'s job(s) {' '.join(ids[-3:])} still run is "
                        f"unknown; submitted nothing: try again once `squeue` works")
    active = [j for j in jobs if scheduler.is_active(queued.get(j))]
    if held is not None and gone(held, queued=queued) is None:
        raise UserError(holder_line(held, name, run.lease_path, active))
    if active:
        raise UserError(f"run {name} already has job {active[-1]} {queued[active[-1]].lower()} "
                        f"({scheduler.queue_hint(active[-1])}); submitted nothing: wait for it to end, or cancel "
                        f"it first: scancel {' '.join(active)}")


@contextmanager
def _locked(path: Path):
    """A short exclusive lock around read-decide-write of the lease (two takers of a stale lease, a heartbeat
    racing a takeover): advisory, held for milliseconds, never across a step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / ".lease.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


_HELD: list["Lease"] = []  # the leases this process holds


def lost() -> str | None:
    """The run whose lease this process held and lost (another writer took it over), or None."""
    return next((held.run_name for held in _HELD if held.lost), None)


class Lease:
    """Hold a run folder's lease: `with Lease(path, name):` acquires (or raises UserError), heartbeats from a daemon
    thread, and releases on the way out, whatever the way out."""

    def __init__(self, path, run_name: str, heartbeat_s: float = HEARTBEAT_S):
        self.path, self.run_name, self.heartbeat_s = Path(path), run_name, heartbeat_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> "Lease":
        me = this_owner()
        with _locked(self.path):
            held = read(self.path)
            if held is not None and not same_owner(held, me):
                reason = gone(held)
                if reason is None:
                    raise UserError(holder_line(held, self.run_name, self.path))
                print(f"lease: taking over run {self.run_name} from {held.get('owner')}: {reason}", file=sys.stderr,
                      flush=True)
            now = time.time()
            self.record = {**me, "token": self.token, "acquired": now, "heartbeat": now, "argv": sys.argv[1:]}
            atomic_write_json(self.path, self.record)
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        _HELD.append(self)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with _locked(self.path):
                    held = read(self.path)
                    if held is None or held.get("token") != self.token:
                        self.lost = True
                        print(f"lease: run {self.run_name}'s lease was taken over by "
                              f"{(held or {}).get('owner', 'nobody')}; this process no longer holds it",
                              file=sys.stderr, flush=True)
                        return
                    atomic_write_json(self.path, {**self.record, "heartbeat": time.time()})
            except OSError as exc:  # shared storage hiccup: try again at the next beat
                print(f"lease: heartbeat of {self.path} failed ({exc}); retrying", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self in _HELD:
            _HELD.remove(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with _locked(self.path):
            held = read(self.path)
            if held is not None and held.get("token") == self.token:
                self.path.unlink()

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def trusted_from_parent(path) -> bool:
    """A local rank spawned by a launcher that holds this run's lease (its token is in our environment)."""
    token = os.environ.get(TOKEN_ENV)
    return bool(token) and (read(path) or {}).get("token") == token
