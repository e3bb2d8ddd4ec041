"""A site's profile on the real local cluster (slurm/dev/up.sh): what the submitting shell leaves in the
environment does not reach the ranks, profile values expand shell variables in the job, a failed tokenizer job
ends the GPU job waiting on it, and a refused sbatch is one line that leaves no job behind. Run with the cluster
up: ``pytest -m slurm``."""

import pytest

from slurm_fixtures import sh, slurm_cluster, wait_state  # noqa: F401 (fixture)
from test_base_train import TINY, base  # noqa: F401 (fixture)
from test_slurm_harness import submission, submit, summary

pytestmark = pytest.mark.slurm


def test_torchrun_variables_of_the_submitting_shell_do_not_reach_the_ranks(slurm_cluster, base):  # noqa: F811
    """sbatch exports the submitting shell's environment: there RANK=5 WORLD_SIZE=8 would make each task rank 5 of
    8, and MASTER_ADDR/PORT would send the rendezvous elsewhere. base_dir names a variable the job expands."""
    leaked = dict(MASTER_ADDR="nowhere.invalid", MASTER_PORT="1", RANK="5", WORLD_SIZE="8", LOCAL_RANK="3",
                  LOCAL_WORLD_SIZE="4")
    job, _ = submit(base, "site-a", "stages=[base_train]", "cluster.nodes=2", "device_batch_size=4", *TINY,
                    "cluster.base_dir='$SITE_TEST_BASE'", SITE_TEST_BASE=str(base), **leaked)
    assert summary(base, "site-a")["world_size"] == 2  # the run folder is under the expanded base_dir
    log = (base / "runs" / "site-a" / "slurm" / f"{job}_0_log.out").read_text()
    address = slurm_cluster["addresses"]["n1"]
    line = f"rendezvous: 2 ranks (slurm) at {address} (n1) port {15000 + job % 17000}"
    ours = [row for row in log.splitlines() if not row.startswith("submitit ")]  # submitit's own come first
    assert ours[0] == line and log.count("rendezvous:") == 1, log  # rank 0's first line, once a process


def test_a_tokenizer_job_that_does_not_succeed_ends_the_gpu_job_waiting_on_it(slurm_cluster, base):  # noqa: F811
    """The tokenizer job ends without success (here cancelled): Slurm cancels the GPU job rather than keeping it
    PENDING (DependencyNeverSatisfied) forever."""
    job, _ = submit(base, "site-b", "stages=[tok_train,base_train]", *TINY, tokenizer=False)
    sh("scancel", str(job - 1))
    assert wait_state(job - 1, "CANCELLED", timeout=60)
    assert wait_state(job, "CANCELLED", timeout=60)


def test_a_refused_sbatch_is_one_line_and_leaves_no_job_behind(slurm_cluster, base):  # noqa: F811
    result = submission(base, "site-c", "stages=[tok_train,base_train]", "cluster.partition=nope", tokenizer=False)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.strip() == ("error: sbatch refused the tokenizer job of run site-c: invalid partition "
                                     "specified: nope; Batch job submission failed: Invalid partition name specified")
    # the tokenizer job goes in, the GPU job is refused: the tokenizer job is cancelled, not left to run alone
    result = submission(base, "site-c", "stages=[tok_train,base_train]", "cluster.partition=nope",
                        "cluster.cpu_job.partition=debug", tokenizer=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: sbatch refused the GPU job of run site-c: invalid partition specified: nope")
    tokenizer_job = int(line.split("(tokenizer job ")[1].split(",")[0])
    assert line.endswith(f"(tokenizer job {tokenizer_job}, submitted before it, cancelled)")
    assert wait_state(tokenizer_job, "CANCELLED", timeout=30)
    assert not (base / "runs" / "site-c" / "slurm" / "jobs.jsonl").exists()
