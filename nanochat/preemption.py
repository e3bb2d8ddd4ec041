"""Preemption, time limits and cancellation: the one module that owns signals.

| signal | who sends it | what happens |
| --- | --- | --- |
| SIGUSR2 | Slurm, `lead` s before the time limit (`--signal=USR2@lead`, no `B:` so every task gets it, not only the batch shell); `scancel --signal=USR2` | flag only; at the next step boundary all ranks agree, save one checkpoint, rank 0 requeues the job, all exit cleanly |
| SIGTERM | Slurm on preemption where `send_user_signal` is off; `scancel`; a node shutting down | flag only; at the boundary the job's state tells them apart: PREEMPTED is saved and requeued like USR2, anything else (a user's scancel) stops without a requeue |
| SIGINT | Ctrl-C in a terminal | Python's default: KeyboardInterrupt |

A handler never does I/O or collectives itself: it runs on one rank at an arbitrary point (submitit's own USR2
handler checkpoints on rank 0 inside the handler, which is why `install()` replaces it). Requeues are counted in
the checkpoint and capped; a job that fails for a real error raises and is never requeued.
"""

import signal

from nanochat import scheduler
from nanochat.common import print0
from nanochat.scheduler import SlurmJob


class Interrupted(Exception):
    """A stage stopped at a step boundary after saving, because a signal asked it to."""

    def __init__(self, message: str, requeued: bool):
        super().__init__(message)
        self.requeued = requeued


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

    def should_requeue(self) -> bool:
        """After the ranks agreed to stop: requeue for USR2 or a preemption, not for a user's scancel."""
        if self.usr2:
            return True
        return scheduler.job_state(SlurmJob.from_env().requeue_id) == "PREEMPTED"


HANDLER = Preemption()  # installed by the launcher's entry points, read by the training and evaluation loops


def agreed_requeue(requeues: int, max_requeues: int) -> bool:
    """Collective, once the ranks agreed to stop: whether to requeue (USR2 or a preemption on any rank), with
    the cap enforced: past it the stage fails for good instead of looping."""
    from nanochat.distributed import agree

    (requeue_job,) = agree(HANDLER.should_requeue())
    if requeue_job and requeues >= max_requeues:
        raise RuntimeError(f"stopping for good: this stage was requeued {requeues} times (max_requeues={max_requeues})")
    return requeue_job


def stop(what: str, requeue_job: bool, rank: int) -> None:
    """After the stage saved its state: rank 0 requeues the job if asked; every rank raises Interrupted."""
    requeued = requeue_job and (rank != 0 or requeue())
    raise Interrupted(f"{what}; " + ("the job was requeued and will resume" if requeued else
                                     "run the same command again to resume"), requeued=requeued)


def requeue() -> bool:
    """Ask Slurm to requeue this job (rank 0 only). False outside Slurm or when Slurm refused."""
    job = SlurmJob.from_env().requeue_id
    if job is None:
        return False
    ok, error = scheduler.requeue(job)
    if not ok:
        print0(error)
    return ok
