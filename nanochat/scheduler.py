"""Slurm, as the Python code sees it: the one module that reads Slurm's environment variables and runs its
commands (squeue, sacct, scontrol, scancel; submitit runs sbatch itself). Standard library only, so that the login
node, scaling/ and the jobs can all import it.

Outside Slurm (a laptop, a test) every field of `SlurmJob` is None. The queries tell "no jobs" ({}) from "could
not ask" (None: no squeue/sacct on PATH, an error, no answer in time): a missing or slow scheduler is never an
error here, each caller decides what that means (a resubmission submits nothing, a status line shows '?').
"""

import getpass
import os
import re
import subprocess
from dataclasses import dataclass

from nanochat.common import UserError

# SlurmJob field -> the variable Slurm sets in a job (one map, as submitit's SlurmJobEnvironment keeps one)
ENV = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
       "procid": "SLURM_PROCID", "ntasks": "SLURM_NTASKS", "localid": "SLURM_LOCALID",
       "nodelist": "SLURM_JOB_NODELIST", "num_nodes": "SLURM_JOB_NUM_NODES", "submit_host": "SLURM_SUBMIT_HOST",
       "node_name": "SLURMD_NODENAME", "restart_count": "SLURM_RESTART_COUNT", "step_id": "SLURM_STEP_ID"}
# The ids of steps that srun did not start (slurm.h: SLURM_EXTERN_CONT, SLURM_BATCH_SCRIPT, SLURM_INTERACTIVE_STEP),
# should a process of one carry SLURM_STEP_ID. On the dev cluster (Slurm 22.05) a 2-task job's batch shell has
# SLURM_NTASKS=2, SLURM_PROCID=0 and no SLURM_STEP_ID; its srun tasks have SLURM_STEP_ID=0
SPECIAL_STEPS = frozenset({"4294967292", "4294967291", "4294967290"})
NUMBERS = {"procid", "ntasks", "localid", "num_nodes", "restart_count"}  # the fields read as int


@dataclass(frozen=True)
class SlurmJob:
    """This process's job and task, from the environment Slurm gave it; None where a variable is not set."""
    job_id: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    procid: int | None = None  # this task's rank in the job step
    ntasks: int | None = None
    localid: int | None = None  # its rank on this node
    nodelist: str | None = None  # e.g. gpu[003-005,9]
    num_nodes: int | None = None
    submit_host: str | None = None  # the login node sbatch ran on
    node_name: str | None = None  # this node, as Slurm names it
    restart_count: int | None = None  # how many times the job was requeued; unset in its first run
    step_id: str | None = None  # set in the tasks of an srun step; not in a batch or salloc shell

    @property
    def in_step(self) -> bool:
        """Whether this process is a task that srun started, so that procid and ntasks describe its step's ranks
        (in a batch or salloc shell they describe the allocation, whose tasks nobody started yet)."""
        return self.step_id is not None and self.step_id not in SPECIAL_STEPS

    @classmethod
    def from_env(cls, env=os.environ) -> "SlurmJob":
        return cls(**{name: int(env[var]) if name in NUMBERS else env[var] for name, var in ENV.items() if var in env})

    @property
    def requeue_id(self) -> str | None:
        """The id `requeue` needs: ARRAYJOB_TASK for an array element (the array's own id would requeue every
        element), else the job id."""
        if self.array_job_id is not None and self.array_task_id is not None:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot parse {ENV['nodelist']}={nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


# squeue states after which a job will not run again (a requeued job shows PENDING, not these)
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"})


def _ask(argv: list[str], timeout: float) -> str | None:
    """A Slurm command's stdout; None when it could not answer (not installed, failed, timed out). squeue -j
    of a job the controller has already forgotten exits 1 ("Invalid job id"): that is an answer, no such job."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "" if "Invalid job id" in out.stderr else None
    return out.stdout


def queued_jobs(user: str | None = None, ids: list[str] | None = None, timeout: float = 60) -> dict[str, str] | None:
    """Jobs in the queue, one per array element ({'123_4': 'RUNNING'}): those of `ids` (any user's), else a
    user's (default: this one's). {} when there are none; None when squeue could not answer (missing, failed,
    timed out): never read None as "nothing is queued"."""
    selection = ["-j", ",".join(ids)] if ids else ["-u", user or getpass.getuser()]
    out = _ask(["squeue", "-h", "-r", *selection, "-o", "%i|%T"], timeout)
    if out is None:
        return None
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def is_active(state: str | None) -> bool:
    """Whether a job in this squeue state may still run (pending, running, completing, suspended, ...)."""
    return state is not None and state.split()[0] not in FINAL_STATES


def accounting_states(ids: list[str]) -> dict[str, str] | None:
    """{job id: state} from the accounting database, for jobs that may have left the queue; None when sacct
    could not answer."""
    out = _ask(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)], 20)
    if out is None:
        return None
    return {line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line}


def was_preempted(job_id: str) -> bool | None:
    """Whether the controller selected this job for preemption (its PreemptTime is set: during the GraceTime the job
    still shows RUNNING, so its state does not tell); None when scontrol could not answer (a container)."""
    out = _ask(["scontrol", "-o", "show", "job", job_id], 10)  # inside a GraceTime: unsure soon, not sure late
    if not out:
        return None
    fields = dict(item.partition("=")[::2] for item in out.split())
    return fields.get("PreemptTime", "None") not in ("None", "Unknown", "")


def _act(argv: list[str]) -> str | None:
    """Run a Slurm command that changes something: None when it did, else what went wrong."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:  # not in this container, or a stuck controller
        return f"{' '.join(argv)} failed: {exc}"
    return f"{' '.join(argv)} failed: {result.stderr.strip()}" if result.returncode != 0 else None


def requeue(job_id: str) -> tuple[bool, str | None]:
    """Ask Slurm to requeue a job: (True, None), or (False, what Slurm said)."""
    error = _act(["scontrol", "requeue", job_id])
    return error is None, error


def cancel(job_id: str) -> str | None:
    """scancel a job: None when done, else what went wrong."""
    return _act(["scancel", job_id])


def queue_hint(job_id: str) -> str:
    """The command that shows a job in the queue, for messages to the user."""
    return f"squeue -j {job_id}"
