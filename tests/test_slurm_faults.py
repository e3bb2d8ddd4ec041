"""What real clusters do to a run, done for real on the local cluster (slurm/dev/up.sh): preemption by SIGTERM
with a grace time under PreemptMode=REQUEUE and CANCEL, Slurm commands hidden from the ranks (a container),
a frozen rank, a node that dies. Each run must end with the uninterrupted run's weights, each step logged once,
the restarts counted by kind, and the run's lease taken back by the requeued job."""

import getpass
import json
import os
import re
import sys
import time

import pytest

from slurm_fixtures import (CANCEL_PARTITION, HIDE_SLURM_COMMANDS, REPO, describe, freeze_rank, job_field,  # noqa: F401
                            job_nodes, node_killer, preempt, sbatch, sh, shared_tmpfs, slurm_cluster, wait_for,
                            wait_state)
from test_base_train import base  # noqa: F401 (fixture)
from test_slurm_harness import local_started, logged_step, stage_dir, submit, summary

pytestmark = pytest.mark.slurm
# Quick steps (~0.2 s): the time of each test is the scheduler's and the faults', not training's.
QUICK = ["stages=[base_train]", "depth=2", "max_seq_len=128", "total_batch_size=1024", "eval_every=-1",
         "sample_every=-1", "save_every_minutes=0"]
STEPS = 30
RUN = [*QUICK, "device_batch_size=4", f"num_iterations={STEPS}", "save_every=5"]
# 4 ranks on 2 nodes, each node with its 2 (fake) GPUs requested as a GPU profile would
WIDE = ["cluster.nodes=2", "cluster.tasks_per_node=2", "cluster.gpus_per_node=2", "device_batch_size=2",
        "data_shards=4"]
HIDDEN = f"cluster.python='{HIDE_SLURM_COMMANDS} {sys.executable}'"  # the ranks cannot run scontrol & co
KINDS = ("preemptions", "time_limits", "node_failures")


@pytest.fixture(scope="module")
def one_rank(base):  # noqa: F811
    """The uninterrupted run, once per configuration (here: one rank), trained while the first test that needs it
    waits on Slurm: a function that returns its summary."""
    return local_started(base, "faults-straight-1", *RUN)


@pytest.fixture(scope="module")
def four_ranks(base):  # noqa: F811
    """The same on four local ranks, as WIDE has on two nodes."""
    return local_started(base, "faults-straight-4", *RUN, "nproc=4", "device_batch_size=2", "data_shards=4")


def squeue_state(job: int) -> str:
    return sh("squeue", "-h", "-j", str(job), "-o", "%T", check=False) or "GONE"


def recovery(base, name, job: int, fault: str, signalled: float, first_pid: int, timeout: float = 240) -> dict:
    """Watch a run through a fault until its first resumed step; print and return the figures: fault -> the
    job's ranks all stopped (it leaves RUNNING), -> its first resumed step, the scheduler's own wait between the
    two runs (PENDING again -> RUNNING), and the work lost (steps done before the fault and done again). The
    resumed job must hold the run's lease: the same job, another process than `first_pid`."""
    seen, left, back, deadline = {}, None, None, time.monotonic() + timeout
    metrics = stage_dir(base, name) / "metrics.jsonl"
    while time.monotonic() < deadline:
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        steps = {r["step"]: r for r in rows if "loss" in r}
        if left is None:
            seen.update(steps)
        state = squeue_state(job)
        now = time.time()
        if left is None and state != "RUNNING":
            left = now
        elif left is not None and back is None and state == "RUNNING":
            back = now
        resumed = [r for r in steps.values() if back is not None and r["wall"] > back]
        if resumed:
            first = min(resumed, key=lambda r: r["step"])
            lease = json.loads((base / "runs" / name / "lease.json").read_text())
            assert lease["job_id"] == str(job) and lease["pid"] != first_pid, lease
            lost = [s for s in seen if s >= first["step"]]
            figures = {"stopped_s": left - signalled, "first_step_s": first["wall"] - signalled,
                       "scheduler_wait_s": back - left, "lost_steps": len(lost),
                       "lost_s": sum(seen[s]["dt"] for s in lost)}
            print(f"\n{fault}: all ranks stopped {figures['stopped_s']:.1f} s after it; first resumed step "
                  f"{figures['first_step_s']:.1f} s after it, of which the scheduler's own wait "
                  f"{figures['scheduler_wait_s']:.1f} s; work lost {len(lost)} step(s), {figures['lost_s']:.1f} s")
            return figures
        time.sleep(0.2)
    raise TimeoutError(f"{name}: no resumed step {timeout:.0f} s after the {fault}")


def job_pid(base, name) -> int | None:
    lease = base / "runs" / name / "lease.json"
    return json.loads(lease.read_text()).get("pid") if lease.is_file() else None


def wait_running_step(base, name, step: int) -> int:
    """Wait until the run logged `step`; the pid holding its lease then."""
    wait_for(lambda: logged_step(base, name) >= step, 240, f"step {step} of {name}")
    return job_pid(base, name)


def finished(base, name, job: int, reference, resumed: bool = True, **counts) -> dict:
    """The run ended with the uninterrupted weights, every step logged once, and these restart counts (the
    checkpoint's: a restart before the first checkpoint is a fresh start, not counted)."""
    result = summary(base, name, timeout=420)
    rows = [json.loads(line) for line in (stage_dir(base, name) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert result["weights_sha256"] == reference()[0]["weights_sha256"]
    expected = {k: counts.get(k, 0) for k in KINDS}
    assert {k: result[k] for k in KINDS} == expected and result["requeues"] == sum(expected.values())
    log = "".join(p.read_text() for p in (base / "runs" / name / "slurm").glob(f"{job}_*_log.out"))
    assert ("resumed from step_" in log) == resumed and "is in use by" not in log
    return result


def test_sigterm_preemption_under_requeue_mode(slurm_cluster, base, one_rank):  # noqa: F811
    job, _ = submit(base, "pre-rq", *RUN)
    pid = wait_running_step(base, "pre-rq", 4)
    signalled = time.time()
    high = preempt(job)
    recovery(base, "pre-rq", job, "SIGTERM preemption (REQUEUE, GraceTime 10 s)", signalled, pid)
    finished(base, "pre-rq", job, one_rank, preemptions=1)
    assert wait_state(job, "COMPLETED", timeout=60) and wait_state(high, "COMPLETED", timeout=60)


def test_sigterm_preemption_under_cancel_mode(slurm_cluster, base, one_rank):  # noqa: F811
    job, _ = submit(base, "pre-cancel", *RUN, f"cluster.partition={CANCEL_PARTITION}")
    pid = wait_running_step(base, "pre-cancel", 4)
    signalled = time.time()
    preempt(job)
    recovery(base, "pre-cancel", job, "SIGTERM preemption (CANCEL, GraceTime 10 s)", signalled, pid)
    finished(base, "pre-cancel", job, one_rank, preemptions=1)


def test_usr2_checkpoints_requeues_and_resumes_exactly(slurm_cluster, base, one_rank):  # noqa: F811
    """The time-limit notice (USR2, `--signal` lead): rank 0 saves and asks Slurm to requeue the job."""
    job, _ = submit(base, "usr2", *RUN)
    pid = wait_running_step(base, "usr2", 4)
    signalled = time.time()
    sh("scancel", "--signal=USR2", str(job))
    recovery(base, "usr2", job, "time-limit notice (USR2)", signalled, pid)
    finished(base, "usr2", job, one_rank, time_limits=1)
    assert wait_state(job, "COMPLETED", timeout=60)


def test_commands_hidden_time_limit_and_preemption_requeue_from_the_batch_step(slurm_cluster, base,  # noqa: F811
                                                                                 one_rank):
    job, _ = submit(base, "hidden", *RUN, HIDDEN, f"cluster.partition={CANCEL_PARTITION}")
    pid = wait_running_step(base, "hidden", 4)
    signalled = time.time()
    sh("scancel", "--signal=USR2", str(job))  # the time-limit notice: exit 75, the batch step requeues
    recovery(base, "hidden", job, "USR2 with the Slurm commands hidden (batch-step requeue)", signalled, pid)
    wait_for(lambda: logged_step(base, "hidden") >= 12, 240, "step 12 after the first requeue")
    preempt(job)  # SIGTERM; the ranks cannot ask Slurm: exit 76, the batch step sees PreemptTime and requeues
    finished(base, "hidden", job, one_rank, preemptions=1, time_limits=1)
    log = "".join(p.read_text() for p in (base / "runs" / "hidden" / "slurm").glob(f"{job}_*_log.out"))
    assert "Slurm cannot be asked whether job" in log


def test_a_frozen_rank_is_requeued_within_the_step_timeout(slurm_cluster, base, four_ranks):  # noqa: F811
    job, _ = submit(base, "frozen-4", *RUN, *WIDE, HIDDEN, "step_timeout_s=15")  # in a container: verdicts
    pid = wait_running_step(base, "frozen-4", 6)
    signalled = time.time()
    freeze_rank(job, 3)
    recovery(base, "frozen-4", job, "frozen rank (SIGSTOP, step timeout 15 s)", signalled, pid)
    finished(base, "frozen-4", job, four_ranks, node_failures=1)


def test_the_batch_steps_node_dies_and_the_run_goes_on(slurm_cluster, node_killer, base, four_ranks):  # noqa: F811
    """The node of the batch step dies: Slurm ends that run (NODE_FAIL) and requeues the job, which resumes on the nodes
    left. The ranks cannot run Slurm's commands (a container), which this does not need. (The chaos run below loses
    the other node, which the batch step notices and requeues from.)"""
    job, _ = submit(base, "dead-batch", *RUN, *WIDE, HIDDEN, "step_timeout_s=15")
    pid = wait_running_step(base, "dead-batch", 6)
    assert "--gpus-per-node=2" in next((base / "runs" / "dead-batch" / "slurm").glob("*_submission.sh")).read_text()
    node = job_nodes(job)[0]
    signalled = time.time()
    node_killer(node)
    recovery(base, "dead-batch", job, "node killed (link down, SIGKILL; the batch step's node)", signalled, pid)
    finished(base, "dead-batch", job, four_ranks, node_failures=1)
    assert_known_failed(job, node, base / "runs" / "dead-batch" / "slurm")


def assert_known_failed(job: int, node: str, logs) -> None:
    """`node` is known as failed from then on: excluded by the batch step that requeued the job, or (Slurm requeued
    it for the NODE_FAIL) named by the next run's, to be excluded at the next requeue."""
    excluded = job_field(job, "ExcNodeList")
    batch_log = "".join(p.read_text() for p in logs.glob(f"{job}_*_log.err"))
    named = re.search(rf"before_srun: job {job}: node\(s\) (.*) failed under an earlier run", batch_log)
    assert (excluded != "(null)" and node in sh("scontrol", "show", "hostnames", excluded).split()
            or named and node in named.group(1).split()), (excluded, batch_log)


def test_a_preemption_before_python_can_handle_it_is_requeued(slurm_cluster, base, one_rank, tmp_path):  # noqa: F811
    """The first run's tasks start slowly (a container starting, a cold filesystem): the preemption's SIGTERM kills
    them before any handler is installed. The batch step sees the job was preempted and requeues it; the next run
    learns how this one ended (accounting says REQUEUED; the batch step recorded PREEMPTED) and runs to the end."""
    slow = tmp_path / "slow-python"
    slow.write_text(f'#!/bin/sh\necho "ends=$NANOCHAT_SLURM_ENDS" >&2\n'
                    f'[ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] && sleep 60\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    job, _ = submit(base, "pre-start", *RUN, f"cluster.python={slow}", f"cluster.partition={CANCEL_PARTITION}")
    wait_state(job, "RUNNING", timeout=60)
    time.sleep(3)  # the task is in its sleep
    preempt(job)
    finished(base, "pre-start", job, one_rank, resumed=False)
    logs = base / "runs" / "pre-start" / "slurm"
    batch = "".join(p.read_text() for p in logs.glob(f"{job}_*_log.*"))
    assert "before the ranks could save" in batch and "ends=PREEMPTED" in batch, batch


def test_excluding_failed_nodes_keeps_what_the_job_excluded_already(slurm_cluster):  # noqa: F811
    exclude = str(REPO / "slurm" / "exclude_nodes.sh")
    job = sbatch("#!/bin/sh\ntrue\n", "--hold", "--exclude=n3")  # pending, as a requeued job is
    try:
        assert "excluded node(s) n1,n3" in sh("bash", exclude, str(job), "n1", "n[1]")
        assert job_field(job, "ExcNodeList") == "n1,n3"
        assert sh("bash", exclude, str(job), "n3") == ""  # nothing new: no update
    finally:
        sh("scancel", str(job))


# 120 quick steps on two ranks on two nodes (a node can die), saved every 10 steps: 20 steps between faults.
CHAOS = [*QUICK, "device_batch_size=4", "num_iterations=120", "save_every=10"]


def test_chaos_run_meets_everything_in_turn_and_ends_with_the_uninterrupted_weights(  # noqa: F811
        slurm_cluster, node_killer, shared_tmpfs, base):
    reference = local_started(base, "chaos-straight", *CHAOS, "nproc=2")
    quota = shared_tmpfs(300)  # the run folder's filesystem: a quota that fills up
    args = [*CHAOS, "cluster.nodes=2", "cluster.tasks_per_node=1", "step_timeout_s=10", f"runs_root={quota}"]
    stage = quota / "chaos" / "base_train"

    def reach(step: int) -> None:
        def logged() -> bool:
            rows = (stage / "metrics.jsonl").read_text().splitlines() if (stage / "metrics.jsonl").exists() else []
            return any(json.loads(row).get("step", -1) >= step and "loss" in row for row in rows[-5:])
        try:
            wait_for(logged, 240, f"step {step} of the chaos run")
        except TimeoutError as timeout:  # the quota's logs are gone with its unmount: show them now
            logs = sorted((stage.parent / "slurm").glob("*_log.*"))
            logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
            raise AssertionError(f"{timeout}\n{describe(job)}\n{logs}") from None
        print(f"chaos: step {step} at {time.monotonic() - started:.0f} s")

    # what this run compiled (the nodes' $TMPDIR is this machine's disk): rank 0 copies it to the profile's shared
    # compile cache at the save before the requeue, before any rank leaves and srun takes the others down
    node_tmp, user = base / "chaos-node-tmp", getpass.getuser()
    compiled = node_tmp / f"nanochat-compile-{user}" / "triton" / "kernels.bin"
    compiled.parent.mkdir(parents=True, exist_ok=True)
    compiled.write_bytes(os.urandom(32 * 2**20))
    args.append(f"cluster.compile_cache={base / 'chaos-compile-cache'}")

    started = time.monotonic()
    job, _ = submit(base, "chaos", *args, TMPDIR=str(node_tmp), USER=user)
    reach(20)
    preempt(job)  # SIGTERM, GraceTime, PreemptMode=REQUEUE
    reach(40)
    assert (base / "chaos-compile-cache" / "triton" / "kernels.bin").read_bytes() == compiled.read_bytes()
    sh("scancel", "--signal=USR2", str(job))  # the time-limit notice
    reach(60)
    dead = job_nodes(job)[-1]
    node_killer(dead)  # power loss of the node without the batch step
    reach(80)
    assert_known_failed(job, dead, quota / "chaos" / "slurm")
    freeze_rank(job, 1)
    reach(100)
    filler = quota / "filler"
    with open(filler, "wb") as f:  # fill the quota to the last byte: the next checkpoint cannot be written
        try:
            while True:
                f.write(b"\0" * 2**20)
        except OSError:
            pass
    wait_state(job, "FAILED", timeout=120)  # a full quota does not heal itself: no requeue
    newest = stage / "checkpoints" / (stage / "checkpoints" / "latest").read_text().strip()
    model = next(newest.glob("model*"))
    model.write_bytes(model.read_bytes()[:-40] + bytes(b ^ 0x5A for b in model.read_bytes()[-40:]))
    filler.unlink()  # the quota is freed; the same command again resumes, from the checkpoint before the damaged one
    second, _ = submit(base, "chaos", *args, TMPDIR=str(node_tmp), USER=user)
    wait_for((stage / "summary.json").is_file, 240, "the chaos run to finish")
    elapsed = time.monotonic() - started
    result = json.loads((stage / "summary.json").read_text())
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 121))
    assert result["weights_sha256"] == reference()[0]["weights_sha256"]
    assert {k: result[k] for k in KINDS} == {"preemptions": 1, "time_limits": 1, "node_failures": 2}
    logs = "".join(p.read_text() for p in (quota / "chaos" / "slurm").glob("*_log.*"))
    assert "no space left" in logs.lower() and f"{newest.name}.corrupt" in logs
    assert (newest.parent / f"{newest.name}.corrupt").is_dir()
    print(f"\nchaos run: 120 steps through 6 faults in {elapsed:.0f} s")
    assert elapsed < 300
