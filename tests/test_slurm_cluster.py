"""The local dev cluster (slurm/dev/up.sh) does what the harness relies on: multi-node steps, accounting,
submitit jobs across nodes, and a quick requeue. Run with the cluster up: ``pytest -m slurm``."""
import time

import pytest

from slurm_fixtures import (job_field, job_pythonpath_setup, sbatch, sh, slurm_cluster,  # noqa: F401 (fixture)
                            task_identity, wait_for, wait_state)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def two_node_job(slurm_cluster, tmp_path_factory):
    """One batch job on both nodes (one task each), submitted with ``sbatch --wait``: (job id, its output)."""
    out = tmp_path_factory.mktemp("two_node") / "out.txt"
    script = "#!/bin/bash\nsrun bash -c 'echo \"rank=$SLURM_PROCID node=$SLURMD_NODENAME\"'\n"
    jobid = sbatch(script, "--wait", "-N2", "--ntasks-per-node=1", "-p", slurm_cluster["partition"],
                   "-t", "2", f"--output={out}", timeout=120)
    return jobid, out.read_text()


def test_two_node_step_runs_on_both_nodes(two_node_job):
    _, output = two_node_job
    lines = sorted(line for line in output.splitlines() if line.startswith("rank="))
    assert lines == ["rank=0 node=n1", "rank=1 node=n2"], output


def test_sacct_reports_completed(two_node_job):
    jobid, _ = two_node_job
    assert wait_state(jobid, "COMPLETED", timeout=30) == "COMPLETED"


def test_submitit_job_on_two_nodes(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster["partition"], timeout_min=5, nodes=2,
                               tasks_per_node=1, cpus_per_task=1, slurm_setup=job_pythonpath_setup())
    job = executor.submit(task_identity)
    # submitit's own wait has no timeout: bound it here (done() polls sacct, as wait_state does).
    wait_for(lambda: job.done(), timeout=90, what=f"submitit job {job.job_id}", poll=1)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1], results
    assert {r["node"] for r in results} == {"n1", "n2"}, results
    assert all(r["ntasks"] == 2 for r in results), results


def test_requeue_restarts_quickly(slurm_cluster, tmp_path):
    """``scontrol requeue`` a running job: its second run (SLURM_RESTART_COUNT=1) must finish within a minute.
    Slurm holds a requeued job for cred_expire+1 s (121 s by default); up.sh sets cred_expire=10."""
    marker, log = tmp_path / "first_run_started", tmp_path / "runs.log"
    # No --requeue flag: JobRequeue=1 in slurm.conf makes every job requeue-able, which submitit relies on.
    script = f"""#!/bin/bash
echo "restart=${{SLURM_RESTART_COUNT:-0}} node=$SLURMD_NODENAME" >> {log}
if [ ! -e {marker} ]; then touch {marker}; sleep 300; fi
echo finished >> {log}
"""
    jobid = sbatch(script, "-N1", "-p", slurm_cluster["partition"], "-t", "10", "--open-mode=append",
                   f"--output={tmp_path / 'out.txt'}")
    wait_for(marker.exists, timeout=30, what="the job's first run to start")
    requeued_at = time.monotonic()
    sh("scontrol", "requeue", str(jobid))
    wait_state(jobid, "COMPLETED", timeout=60)
    elapsed = time.monotonic() - requeued_at
    runs = log.read_text().splitlines()
    assert [r.split()[0] for r in runs] == ["restart=0", "restart=1", "finished"], runs
    assert job_field(jobid, "Restarts") == "1"
    assert elapsed < 60, f"requeue to completion took {elapsed:.0f}s"
