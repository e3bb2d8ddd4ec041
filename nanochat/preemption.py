"""Preemption, time limits, cancellation and hangs: the one module that owns signals, why a job stopped or
restarted, and the exit codes a job's ranks leave for the batch step.

| event | who causes it | what happens |
| --- | --- | --- |
| SIGUSR2 | Slurm, `lead` s before the time limit (`--signal=USR2@lead`, no `B:` so every task gets it); `scancel --signal=USR2` | flag only; at the next step boundary the ranks agree, save one checkpoint, and the job is requeued (a time-limit requeue) |
| SIGTERM | Slurm on preemption (GraceTime before the kill; the job still shows RUNNING); a user's `scancel` | flag only; at the boundary the ranks save; rank 0 asks the controller once whether the job was preempted (its PreemptTime) and tells the others: preempted is requeued like USR2, a user's scancel stops without a requeue; where the task cannot ask (a container without scontrol) the ranks exit 76 and the batch step decides |
| no progress for `step_timeout_s` (`startup_timeout_s` before the first step) | a dead node, a frozen or killed peer, a hung collective | nanochat.watchdog: the rank exits 77; the batch step requeues the job with the nodes Slurm sees as down excluded (a node failure) |
| SIGINT | Ctrl-C in a terminal | Python's default: KeyboardInterrupt |

Exit codes of a rank in a Slurm job, read by slurm/after_srun.sh in the batch step (outside any container,
where scontrol works): 0 done, or saved and requeued by rank 0 itself; 75 saved, requeue the job (the task
could not: no scontrol); 76 saved after a SIGTERM the task could not classify: requeue if the job was preempted;
77 no progress within the timeout or a lost peer: requeue, excluding dead nodes. Because srun reports 128+signal
of any task it killed instead, each rank that leaves with 75, 76 or 77, or on an error, also leaves a verdict file
(`leave_verdict`): requeue, sigterm, hung, peer or error; an error verdict is never requeued.

A handler never does I/O or collectives itself: it runs on one rank at an arbitrary point (submitit's own USR2
handler checkpoints on rank 0 inside the handler, which is why `install()` replaces it). Only rank 0 talks to
the controller, at most once per stop. Restarts are counted by kind when a stage resumes (`count_restarts`):
the checkpoint records which job saved it, at which restart, and why it stopped, so every later restart of the
same job is one the ranks asked for (a time limit, a preemption) or one they did not (a node failure, a hang).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

from nanochat import compile_cache, scheduler
from nanochat.common import UserError, print0
from nanochat.scheduler import SlurmJob

EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved; requeue the job
EXIT_SIGTERM = 76  # saved after a SIGTERM: requeue only if the job was preempted
EXIT_HUNG = 77  # no progress: a peer or node is gone; requeue without the dead nodes
EXIT_STOPPED = 1  # saved and stopped for good (a user's scancel)
# Where a rank that leaves abnormally says why, for the batch step: srun's exit code is the highest of its tasks'
# or 128+signal of any task it killed (--kill-on-bad-exit), so a 77 is lost when a frozen peer is SIGKILLed.
VERDICT_DIR_ENV = "NANOCHAT_VERDICT_DIR"
# what gloo and NCCL say when a collective lost a peer (killed, OOM, its node dead), not a bug in this rank
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
             "Watchdog caught collective operation timeout", "ncclRemoteError",
             "remote process exited or there was a network error")

# why the ranks stopped, in the order rank 0 broadcasts them; and which restart counter each one feeds
REASONS = ("cancelled", "time_limit", "preemption", "sigterm")
COUNTER = {"time_limit": "time_limits", "preemption": "preemptions", "sigterm": "preemptions"}
KINDS = ("preemptions", "time_limits", "node_failures")  # restart counters; `requeues` is their total
# how each earlier run of this job ended, by Slurm's accounting (slurm/before_srun.sh exports it before srun)
ENDS_ENV = "NANOCHAT_SLURM_ENDS"
END_KINDS = {"PREEMPTED": "preemptions", "TIMEOUT": "time_limits", "NODE_FAIL": "node_failures"}
# nodes that failed under an earlier run of this job (slurm/before_srun.sh), which a requeue excludes
FAILED_NODES_ENV = "NANOCHAT_FAILED_NODES"
# seconds between Slurm's time-limit notice (USR2) and the limit: the profile's signal_lead_s, in the job's env
SIGNAL_LEAD_ENV = "NANOCHAT_SIGNAL_LEAD_S"
SIGTERM_NEXT = "the batch step requeues the job if it was preempted"
EXCLUDE_NODES = Path(__file__).resolve().parent.parent / "slurm" / "exclude_nodes.sh"


class Interrupted(Exception):
    """A stage stopped at a step boundary after saving, because a signal asked it to. `exit_code` is what a
    rank of a Slurm job exits with (above)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Preemption:
    def __init__(self):
        self.usr2 = False
        self.term = False

    def install(self) -> "Preemption":
        signal.signal(signal.SIGUSR2, self._on_usr2)
        signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_usr2(self, signum, frame) -> None:
        self.usr2 = True

    def _on_term(self, signum, frame) -> None:
        self.term = True

    @property
    def requested(self) -> bool:
        """Some signal asked this rank to stop (to be agreed with the other ranks at the step boundary)."""
        return self.usr2 or self.term


HANDLER = Preemption()  # installed by the launcher's entry points, read by the training and evaluation loops


def classify(usr2: bool) -> str:
    """Rank 0, once the ranks agreed to stop: why (one of REASONS). Asks the controller at most once."""
    if usr2:
        return "time_limit"
    job = SlurmJob.from_env().requeue_id
    if job is None:
        return "cancelled"  # outside Slurm a TERM is someone stopping the run
    preempted = scheduler.was_preempted(job)
    if preempted is None:
        print0(f"SIGTERM: Slurm cannot be asked whether job {job} was preempted (scontrol is missing or did not "
               f"answer): the batch step decides")
        return "sigterm"
    return "preemption" if preempted else "cancelled"


def agreed_reason(rank: int, counters: dict, cfg) -> str:
    """Collective, once the ranks agreed to stop: why, decided by rank 0 and broadcast. A requeue past one of the
    caps becomes "capped": the stage saves and stops for good instead of looping."""
    from nanochat.distributed import agree, max_across_ranks

    (usr2,) = agree(HANDLER.usr2)  # a time-limit notice on any rank
    (code,) = max_across_ranks(REASONS.index(classify(usr2)) if rank == 0 else 0)
    reason = REASONS[code]
    if reason in COUNTER:
        after = {**counters, COUNTER[reason]: counters[COUNTER[reason]] + 1, "requeues": counters["requeues"] + 1}
        over = capped(after, cfg)
        if over:
            return f"capped: {over}"
    return reason


def capped(counters: dict, cfg) -> str | None:
    """Which cap these counts exceed, as words for the message; None when none."""
    for kind in (*KINDS, "requeues"):
        cap = getattr(cfg, f"max_{kind}")
        if counters.get(kind, 0) > cap:
            return f"{counters[kind]} {kind.replace('_', ' ')} (max_{kind}={cap})"
    return None


def stop(what: str, reason: str, rank: int) -> None:
    """After the stage saved its state: rank 0 copies its compile cache back and requeues the job when that is why
    it stopped; every rank raises Interrupted with the exit code that tells the batch step what is left to do (75
    and 76 also leave a verdict)."""
    from nanochat.distributed import max_across_ranks
    from nanochat.watchdog import WATCHDOG

    max_across_ranks(0)  # every rank has saved its part before any leaves (a local launcher kills the rest)
    if reason.startswith("capped"):
        raise UserError(f"{what}; stopping for good: {reason.split(': ', 1)[1]}")
    if reason == "sigterm":  # first: the grace time may end while the cache is copied (the batch step then acts)
        leave_verdict(VERDICTS[EXIT_SIGTERM], f"{what}; {SIGTERM_NEXT}")
    # A third of Slurm's notice (NANOCHAT_SIGNAL_LEAD_S) at most: the requeue below must still come before the
    # time limit. Every rank waits for the copy, as long as it may take: the first to leave has srun take the others
    # down, and Slurm's requeue ends them all.
    WATCHDOG.beat(slow="rank 0 copies the compile cache back")
    compile_cache.publish(rank, budget_s=float(os.environ.get(SIGNAL_LEAD_ENV, "180")) / 3)
    max_across_ranks(0)
    if reason == "cancelled":
        raise Interrupted(f"{what}; run the same command again to resume", EXIT_STOPPED)
    if reason == "sigterm":
        raise Interrupted(f"{what}; {SIGTERM_NEXT}", EXIT_SIGTERM)
    (left,) = max_across_ranks(rank == 0 and not requeue())  # rank 0 could not requeue: the batch step will
    if not left:
        raise Interrupted(f"{what}; the job was requeued and will resume", 0)
    in_slurm = SlurmJob.from_env().job_id is not None
    then = "the batch step requeues the job" if in_slurm else "run the same command again to resume"
    leave_verdict(VERDICTS[EXIT_REQUEUE], f"{what}; {then}")
    raise Interrupted(f"{what}; {then}", EXIT_REQUEUE)


def requeue() -> bool:
    """Ask Slurm to requeue this job (rank 0 only). False outside Slurm or when Slurm refused or cannot be asked."""
    job = SlurmJob.from_env().requeue_id
    if job is None:
        return False
    ok, error = scheduler.requeue(job)
    if not ok:
        print0(error)
    elif os.environ.get(FAILED_NODES_ENV):  # nodes that failed under an earlier run: out of the next allocation
        subprocess.run(["bash", str(EXCLUDE_NODES), job, os.environ[FAILED_NODES_ENV]], timeout=120, check=False)
    return ok


def stop_record(reason: str | None) -> dict:
    """What a checkpoint (or an evaluation's progress file) records so that a resume can count the restarts
    since: the job, its restart count, and why the ranks stopped (None for a periodic save)."""
    job = SlurmJob.from_env()
    return {"job": job.requeue_id, "restart": job.restart_count or 0, "stop": reason}


def count_restarts(counters: dict, record: dict | None, cfg, stage: str) -> dict:
    """On resume: the counters plus this job's restarts since `record` was saved, by kind. The restart right after
    a stop for a time limit or a preemption is that; any other is what Slurm's accounting says the run ended in
    (ENDS_ENV, from slurm/before_srun.sh: a preemption without grace time, a time limit, a node failure), else a
    node failure or a hang (or a requeue by hand). A resubmission (another job) is not a restart. Past a cap the
    stage stops for good, in one line."""
    counters = {**dict.fromkeys(("requeues", *KINDS), 0), **counters}
    job = SlurmJob.from_env()
    if not record or record.get("job") is None or record["job"] != job.requeue_id:
        return counters
    now, saved_in = job.restart_count or 0, record["restart"]
    ends = os.environ.get(ENDS_ENV, "").split(",")
    for run in range(saved_in, now):
        if run == saved_in and record["stop"] in COUNTER:
            kind = COUNTER[record["stop"]]
        else:
            kind = END_KINDS.get(ends[run] if len(ends) == now else None, "node_failures")
        counters[kind] += 1
        counters["requeues"] += 1
    over = capped(counters, cfg)
    if over:
        raise UserError(f"{stage} stopping for good: the job restarted after {over}")
    return counters


VERDICTS = {EXIT_REQUEUE: "requeue", EXIT_SIGTERM: "sigterm"}  # the exit codes a stop also leaves as a verdict


def leave_verdict(kind: str, detail: str) -> None:
    """A rank of a Slurm job leaving other than done records why, in one file per rank of this run of the job,
    under $NANOCHAT_VERDICT_DIR (the job's log folder, fsynced: the batch step may read it on another node):
    "requeue"/"sigterm" (a stop, as its exit code says), "hung" (the watchdog), "peer" (a collective lost a
    peer) or "error" (anything else: never requeued). slurm/after_srun.sh reads them."""
    folder, job = os.environ.get(VERDICT_DIR_ENV), SlurmJob.from_env()
    if not folder or job.job_id is None:
        return
    name = f"{job.requeue_id}.run{job.restart_count or 0}.rank{job.procid or 0}.{kind}"
    try:
        with open(Path(folder) / name, "w") as f:
            f.write(detail[:2000] + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError:  # the verdict is a hint: the exit code still tells the batch step something
        pass


def peer_lost(exc: BaseException) -> bool:
    """Whether an exception out of a collective says a peer rank is gone."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistNetworkError) or any(marker in str(exc) for marker in PEER_LOST)


def exit_code_after(exc: Exception) -> int | None:
    """A rank leaving on an exception records its verdict; EXIT_HUNG when a collective lost a peer (the job is to be
    requeued), None for an error of its own (the caller re-raises: never requeued)."""
    lost = peer_lost(exc)
    leave_verdict("peer" if lost else "error", f"{type(exc).__name__}: {exc}")
    if not lost:
        return None
    print(f"a peer rank is gone ({exc}); exiting with code {EXIT_HUNG} so that the job is requeued", file=sys.stderr,
          flush=True)
    return EXIT_HUNG
