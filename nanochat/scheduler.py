"""Slurm, as the Python code sees it: the one module that reads Slurm's environment variables and runs its
commands (squeue, sacct, scontrol; submitit runs sbatch itself). Standard library only, so that the login node,
scaling/ and the jobs can all import it.

Outside Slurm (a laptop, a test) every field of `SlurmJob` is None and the commands' answers are empty: a
missing or slow scheduler is never an error here, each caller decides what that means.
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
       "node_name": "SLURMD_NODENAME"}
NUMBERS = {"procid", "ntasks", "localid", "num_nodes"}  # the fields read as int


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


def job_state(job_id: str | None) -> str | None:
    """A queued or running job's state (RUNNING, PREEMPTED, ...); None outside Slurm, for a job that left the
    queue, or when the scheduler does not answer within 30 s."""
    if job_id is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def queued_jobs(user: str | None = None) -> dict[str, str]:
    """A user's (default: this one's) queued and running jobs, one per array element ({'123_4': 'RUNNING'});
    {} without Slurm."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", user or getpass.getuser(), "-o", "%i|%T"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def accounting_states(ids: list[str]) -> dict[str, str]:
    """{job id: state} from the accounting database, for jobs that may have left the queue; {} without it."""
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line}


def requeue(job_id: str) -> tuple[bool, str | None]:
    """Ask Slurm to requeue a job: (True, None), or (False, what Slurm said)."""
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return False, f"scontrol requeue {job_id} failed: {result.stderr.strip()}"
    return True, None


def queue_hint(job_id: str) -> str:
    """The command that shows a job in the queue, for messages to the user."""
    return f"squeue -j {job_id}"
