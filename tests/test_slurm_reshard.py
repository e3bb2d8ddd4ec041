"""A run moved to another shape of job, on the real local Slurm cluster (slurm/dev/up.sh). Its base_train job on
2 nodes x 1 GPU is preempted (SIGTERM, grace time: the ranks save and the job is requeued); while it waits for two
nodes again its user cancels it and submits the same run on what is free: 1 node x 2 GPUs (the same 2 ranks, no
reshard) and, from a copy of the same checkpoint, 1 node x 1 GPU (resharded from 2 ranks to 1). Both resume from
the checkpoint, train on exactly the rows of an uninterrupted 2-rank run, global batch for global batch, and end
on its loss. Run: pytest -m slurm."""

import shutil
import subprocess
import sys

import pytest

from slurm_fixtures import job_field, preempt, sh, slurm_cluster, wait_for, wait_state  # noqa: F401 (fixture)
from test_base_train import base  # noqa: F401 (fixture)
from test_reshard_resume import LOSS_RTOL, RECORD, global_batches
from test_slurm_faults import QUICK
from test_slurm_harness import local_started, logged_step, stage_dir, submit, summary

pytestmark = pytest.mark.slurm
# 0.4-0.8 s each on 2 busy cores; the preemption lands ~4 steps after it is asked for. Not many more: the same rows
# summed in another order drift apart with each step (1 rank against 2: final loss 0 apart after 20 steps in fp32,
# but 2e-5 relative after 40 in bf16, past LOSS_RTOL)
STEPS = 20
# 4 micro-batches of 2 x 128 tokens a step: 2 per rank on 2 ranks, 4 on one
RUN = [*QUICK, "device_batch_size=2", f"num_iterations={STEPS}", "save_every=-1"]


def shape(nodes: int, gpus_per_node: int) -> list[str]:
    """The job's shape as a GPU profile gives it: one rank per GPU (the dev cluster's GPUs are fake: the ranks train
    on CPUs)."""
    return [f"cluster.nodes={nodes}", f"cluster.gpus_per_node={gpus_per_node}", "cluster.tasks_per_node=0"]


class Moved:
    """The uninterrupted 2-rank run (here, in the background) and the 2-node job, preempted after step 3 and
    cancelled while requeued; then the same run submitted as 1 node x 2 GPUs and, from a copy, as 1 node x 1 GPU."""

    def __init__(self, base, jobs: list[int]):
        self.base, self.records = base, base / "records"
        self.straight = local_started(base, "straight", *RUN, "nproc=2", **self.record("straight"))
        job, _ = submit(base, "moved", *RUN, *shape(2, 1), **self.record("first"))
        jobs.append(job)
        wait_for(lambda: logged_step(base, "moved") >= 3, 240, "step 3 of the 2-node job")
        high = preempt(job, hold_s=120)  # holds both nodes: the requeued job waits for them until cancelled
        jobs.append(high)
        done = stage_dir(base, "moved") / "summary.json"

        def requeued() -> bool:
            assert not done.exists(), "the 2-node job ended before its preemption: raise STEPS"
            return job_field(job, "JobState") == "PENDING"
        wait_for(requeued, 120, f"job {job} to be requeued")
        sh("scancel", str(job), str(high))  # its user gives up waiting for 2 nodes; they are free again
        wait_state(job, "CANCELLED", timeout=60)
        assert "world: 2 rank(s) on 2 node(s)" in self.log("moved", job)
        latest = stage_dir(base, "moved") / "checkpoints" / "latest"
        self.stopped_at = int(latest.read_text().strip().removeprefix("step_"))
        assert 3 <= self.stopped_at < STEPS, self.stopped_at
        shutil.copytree(base / "runs" / "moved", base / "runs" / "moved-on1")
        # both at once, on the nodes the preemption freed
        self.jobs = {"moved": submit(base, "moved", *RUN, *shape(1, 2), **self.record("moved"))[0],
                     "moved-on1": submit(base, "moved-on1", *RUN, *shape(1, 1), **self.record("moved-on1"))[0]}
        jobs.extend(self.jobs.values())

    def log(self, name: str, job: int) -> str:
        return (self.base / "runs" / name / "slurm" / f"{job}_0_log.out").read_text()

    def record(self, name: str) -> dict:
        """The environment that has each rank record its batches in a folder of its own."""
        (self.records / name).mkdir(parents=True)
        return {RECORD: str(self.records / name)}

    def check(self, name: str, ranks: int) -> str:
        """The resumed run ended as the uninterrupted one; its job's log."""
        ours, (theirs, _) = summary(self.base, name), self.straight()
        log = self.log(name, self.jobs[name])
        assert f"world: {ranks} rank(s) on 1 node(s)" in log and f"resumed from step_{self.stopped_at:06d}" in log, \
            log[-3000:]
        straight = global_batches(self.records / "straight")
        resumed = global_batches(self.records / "first", self.records / name)
        assert list(resumed) == list(straight)  # every step trained once: none lost, none done again from step 0
        for step in straight:
            assert resumed[step] == straight[step], f"step {step}: other rows"
        assert ours["world_size"] == ranks and ours["step"] == theirs["step"] == STEPS
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)
        print(f"\n{name} on {ranks} rank(s) from step {self.stopped_at}: final loss {ours['loss']!r} vs "
              f"{theirs['loss']!r} (relative {abs(ours['loss'] / theirs['loss'] - 1):.1e})")
        return log


@pytest.fixture(scope="module")
def moved(slurm_cluster, base):  # noqa: F811
    jobs = []
    try:
        yield Moved(base, jobs)
    finally:  # whatever a failure left queued or running: it would hold nodes for the next tests
        sh("scancel", *map(str, jobs), check=False)


def test_one_node_with_two_gpus_resumes_the_two_node_run_as_it_was(moved):
    log = moved.check("moved", 2)
    assert "resharded" not in log  # the same 2 ranks on one node: nothing to reshard
    ours, (theirs, _) = summary(moved.base, "moved"), moved.straight()
    assert ours["world_sizes"] == [[0, 2]]
    assert ours["weights_sha256"] == theirs["weights_sha256"]  # the same arithmetic, bit for bit


def test_one_gpu_resumes_the_two_node_run_resharded(moved):
    log = moved.check("moved-on1", 1)
    assert "resharded from 2 to 1 ranks" in log
    assert summary(moved.base, "moved-on1")["world_sizes"] == [[0, 2], [moved.stopped_at, 1]]
    status = subprocess.run([sys.executable, "-m", "experiments.status", str(moved.base / "runs" / "moved-on1")],
                            capture_output=True, text=True, timeout=60)
    assert f"on 2 ranks, 1 from step {moved.stopped_at}" in status.stdout, status.stdout + status.stderr
