"""Fixture and helpers for tests that need the local Slurm cluster from slurm/dev/up.sh.

Import what a test module needs (``from slurm_fixtures import slurm_cluster, wait_state``); tests/ is on
sys.path under pytest's default import mode, and jobs get it via PYTHONPATH (``job_pythonpath_setup``) so
that functions defined here can be pickled by submitit and imported again inside a job.

How to wait for a job: never sleep a fixed time. ``wait_state(jobid, {"COMPLETED"}, timeout)`` polls
sacct, the same source submitit reads, which lags the controller by 1-3 s, so "job left squeue" does not
mean "sacct knows its end state" yet. ``wait_for(predicate, timeout)`` covers everything else (a marker
file written by the job, a restart count in ``scontrol show job``).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("NANOCHAT_SLURM_DEV_DIR", "/tmp/nanochat-slurm-dev"))  # slurm/dev/up.sh's state dir
TESTS = REPO / "tests"
# The partitions of slurm/dev/up.sh, all over every node. A job in HIGH_PARTITION that needs a node held by a
# job in PARTITION (the default) or CANCEL_PARTITION preempts it: SIGTERM to its srun tasks at once, the
# rest GRACE_TIME (or more) later, then requeued (PARTITION) or ended PREEMPTED (CANCEL_PARTITION).
PARTITION = "debug"
CANCEL_PARTITION = "cancel"
HIGH_PARTITION = "high"
GRACE_TIME = 10   # GraceTime of debug and cancel (slurm/dev/common.sh)
KILL_WAIT = 5     # slurm.conf KillWait: SIGTERM to SIGKILL on scancel and at the end of a grace time
NODES = ("n1", "n2", "n3")
FAULT = REPO / "slurm" / "dev" / "fault.sh"
# Prefix of a task's interpreter that hides scontrol, srun, sacct ... from it (a container without Slurm).
HIDE_SLURM_COMMANDS = REPO / "slurm" / "dev" / "hide-slurm-commands"
# sacct states after which a job will not run again (REQUEUED is not one: the job comes back).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


def sh(*cmd: str, timeout: float = 30, check: bool = True) -> str:
    """Run a Slurm client command; its stdout, stripped. On failure the message carries stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def sbatch(script: str, *args: str, cwd: Path | None = None, timeout: float = 30) -> int:
    """Submit a batch script given as text (``sbatch --parsable``); the job id. ``--wait`` in args blocks."""
    proc = subprocess.run(["sbatch", "--parsable", *args], input=script, capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return int(proc.stdout.strip().splitlines()[-1].split(";")[0])


def sacct_state(jobid: int) -> str | None:
    """The job's state as accounting has it (``CANCELLED by 0`` -> ``CANCELLED``), None while unknown there.

    Without --duplicates sacct shows the latest run of a requeued job, which is the one a test cares about.
    """
    out = sh("sacct", "-n", "-X", "-P", "-j", str(jobid), "-o", "State", check=False)
    # the last line: a job that lost a node may have an earlier RESIZING record of the same run
    return out.splitlines()[-1].split()[0] if out else None


def job_field(jobid: int, field: str) -> str | None:
    """One ``Key=Value`` field of ``scontrol show job`` (e.g. JobState, Restarts); None once the controller
    has forgotten the job (MinJobAge after it ended)."""
    out = sh("scontrol", "-o", "show", "job", str(jobid), check=False)
    for item in out.split():
        key, _, value = item.partition("=")
        if key == field:
            return value
    return None


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll ``predicate()`` until it returns something truthy (which is returned); TimeoutError naming
    ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def wait_state(jobid: int, states, timeout: float = 60, poll: float = 0.5) -> str:
    """Poll sacct until job ``jobid`` is in one of ``states``; that state. Fails early, with the job's
    details, if it reaches a different final state, and on timeout with the last state seen."""
    states = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = sacct_state(jobid)
        if state in states:
            return state
        if state in FINAL_STATES:
            raise AssertionError(f"job {jobid} ended {state}, wanted {sorted(states)}:\n{describe(jobid)}")
        time.sleep(poll)
    raise TimeoutError(f"job {jobid} not in {sorted(states)} after {timeout:.0f}s (last sacct state {state}):\n"
                       f"{describe(jobid)}")


def sacct_runs(jobid: int) -> list[str]:
    """The state of every run of a job, first run first (``sacct --duplicates``): a requeued job's earlier
    runs show as REQUEUED, PREEMPTED or NODE_FAIL, its latest run as it is now."""
    out = sh("sacct", "-D", "-n", "-X", "-P", "-j", str(jobid), "-o", "State", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def job_nodes(jobid: int) -> list[str]:
    """The nodes a running job holds (its NodeList, expanded)."""
    nodelist = job_field(jobid, "NodeList")
    if not nodelist or nodelist == "(null)":
        raise RuntimeError(f"job {jobid} holds no nodes:\n{describe(jobid)}")
    return sh("scontrol", "show", "hostnames", nodelist).split()


def node_state(node: str) -> str:
    """The node's state as sinfo prints it: idle, mix, alloc, down* (* = not responding), ..."""
    return sh("sinfo", "-h", "-N", "-n", node, "-o", "%t").splitlines()[0]


def preempt(jobid: int, partition: str = HIGH_PARTITION, hold_s: float = 5) -> int:
    """Preempt running job ``jobid``: submit a job in ``partition`` onto its nodes that needs all their CPUs
    (preemption happens only when the high job could not run otherwise); it holds them ``hold_s`` seconds.
    Its job id."""
    nodes = job_nodes(jobid)
    return sbatch(f"#!/bin/bash\nsleep {hold_s}\n", "-p", partition, "-w", ",".join(nodes), "-N", str(len(nodes)),
                  "--exclusive", "-t", "2", "-J", f"preempt-{jobid}", "--output=/dev/null")


def _fault(*args: str, timeout: float = 90) -> str:
    return sh("bash", str(FAULT), *args, timeout=timeout)


def kill_node(node: str) -> None:
    """Power loss of ``node`` (fault.sh kill-node): its link goes down, then slurmd, its slurmstepds and every
    job process on it get SIGKILL. slurmctld notices only later (NOT_RESPONDING, then DOWN). Prefer the
    ``node_killer`` fixture, which revives the node after the test."""
    _fault("kill-node", node)


def revive_node(node: str) -> None:
    """Link up, slurmd started again (fault.sh revive-node); returns once the node is usable."""
    _fault("revive-node", node)


def freeze_rank(jobid: int, rank: int) -> None:
    """SIGSTOP the processes of task ``rank`` of job ``jobid`` (a hung rank); ``thaw_rank`` undoes it."""
    _fault("freeze-rank", str(jobid), str(rank))


def thaw_rank(jobid: int, rank: int) -> None:
    _fault("thaw-rank", str(jobid), str(rank))


@pytest.fixture
def shared_tmpfs(slurm_cluster, tmp_path):
    """``mount(size_mib)``: a real filesystem of that size that this machine and every node see (under the
    cluster's shared mount point $STATE/mnt), to fill up; unmounted after the test."""
    mounted = []

    def mount(size_mib: int) -> Path:
        point = Path(tempfile.mkdtemp(prefix=f"{tmp_path.name}-", dir=STATE / "mnt"))
        sh("mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(point))
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        sh("umount", "-l", str(point), check=False)
        shutil.rmtree(point, ignore_errors=True)  # what a job still running wrote there after the unmount


@pytest.fixture
def node_killer(slurm_cluster):
    """``kill(node)`` for one test; every node it killed is revived afterwards, whether the test passed or not.
    Needs nodes in network namespaces of their own (skips on the loopback fallback)."""
    if not slurm_cluster["isolated"]:
        pytest.skip("the dev cluster's nodes share this machine's network: fault.sh kill-node cannot kill one")
    killed = []

    def kill(node: str) -> None:
        killed.append(node)
        kill_node(node)

    yield kill
    for node in dict.fromkeys(killed):
        revive_node(node)


def describe(jobid: int) -> str:
    """What the controller and accounting know about a job, for failure messages."""
    ctl = sh("scontrol", "show", "job", str(jobid), check=False)
    acct = sh("sacct", "-D", "-j", str(jobid), "-o", "JobID,State,ExitCode,NodeList,Start,End", check=False)
    return f"scontrol:\n{ctl}\nsacct:\n{acct}"


def node_addresses() -> dict[str, str]:
    """Each node's NodeAddr: 10.77.0.x when slurm/dev/up.sh put the nodes in network namespaces of their own,
    127.0.0.1 when it could not (no CAP_NET_ADMIN) and they share this machine's loopback."""
    addresses = {}
    for line in sh("scontrol", "-o", "show", "node").splitlines():
        fields = dict(item.partition("=")[::2] for item in line.split() if "=" in item)
        addresses[fields["NodeName"]] = fields.get("NodeAddr", fields["NodeName"])
    return addresses


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a name
        return address == "localhost"


def job_pythonpath_setup() -> list[str]:
    """``slurm_setup`` lines for submitit: make the repo and tests/ importable in the job, so a function
    pickled from a test helper module (like ``task_identity`` below) can be loaded there."""
    return [f'export PYTHONPATH="{REPO}:{TESTS}${{PYTHONPATH:+:$PYTHONPATH}}"']


def task_identity() -> dict:
    """Runs inside a submitit task: which rank this is and on which Slurm node."""
    return {"rank": int(os.environ["SLURM_PROCID"]), "node": os.environ["SLURMD_NODENAME"],
            "ntasks": int(os.environ["SLURM_NTASKS"])}


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """The running dev cluster (slurm/dev/up.sh), or a skip saying why there is none.

    Tests never start the cluster themselves: CI runs up.sh before the slurm tier, a user runs it once.
    Besides the partition and node names (``partitions``: default, cancel, high): ``addresses`` (node -> NodeAddr) and ``isolated`` (the nodes are
    in network namespaces of their own, so a job's 127.0.0.1 is not this machine's).
    """
    if shutil.which("sinfo") is None:
        pytest.skip("no Slurm client (sinfo) on PATH: start the dev cluster with slurm/dev/up.sh")
    try:
        # scontrol ping answers at once when no controller runs (sinfo retries for ~10 s before failing).
        sh("scontrol", "ping", timeout=15)
        out = sh("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t", timeout=15)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        reason = str(err).splitlines()[0]
        pytest.skip(f"Slurm cluster not up ({reason}): start it with slurm/dev/up.sh")
    states = dict(line.split() for line in out.splitlines())
    missing = [n for n in NODES if n not in states]
    if missing:
        pytest.skip(f"partition {PARTITION!r} lacks nodes {missing} (sinfo: {states}): this is not the "
                    f"slurm/dev cluster")
    # "*" = slurmd not responding; other suffixes (~ # % ...) are power-saving flags that do not matter here.
    down = {n: s for n, s in states.items()
            if s.endswith("*") or s.rstrip("~#%!$@^-") not in {"idle", "mix", "alloc", "comp"}}
    assert not down, f"dev cluster nodes not usable: {down}"
    addresses = node_addresses()
    # isolated: each node has an address of its own, so its loopback is not this machine's (see up.sh).
    isolated = (not any(is_loopback(addresses[n]) for n in NODES)
                and len({addresses[n] for n in NODES}) == len(NODES))
    return {"partition": PARTITION, "partitions": (PARTITION, CANCEL_PARTITION, HIGH_PARTITION), "nodes": NODES,
            "addresses": addresses, "isolated": isolated}
