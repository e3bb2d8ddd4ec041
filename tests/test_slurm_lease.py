"""One writer per run on the real local Slurm cluster (slurm/dev/up.sh): a second submission of a run whose jobs
are queued, or whose lease a running job holds, refuses in one line before sbatch. Run: pytest -m slurm."""

import json
import os
import subprocess
import sys

import pytest

from slurm_fixtures import slurm_cluster, wait_for  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm

RUN = ["run_name=dup", "stages=[tok_train,base_train]", "depth=2", "num_iterations=400", "eval_every=1000",
       "sample_every=-1", "tok_train.vocab_size=1024", "tok_train.max_chars=2000000", "+cluster=localslurm"]


def launch(base, *args):
    return subprocess.run([sys.executable, "-m", "experiments.launch", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NANOCHAT_BASE_DIR": str(base)})


def test_a_second_submission_of_a_run_in_use_refuses_before_sbatch(slurm_cluster, tmp_path):  # noqa: F811
    base = tmp_path / "base"
    run = base / "runs" / "dup"
    first = launch(base, *RUN)
    assert first.returncode == 0, first.stderr
    jobs = [json.loads(line)["job_id"] for line in (run / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert len(jobs) == 2  # the tokenizer's CPU job, then the training job after it
    try:
        queued = launch(base, *RUN)  # at once: the jobs are pending or running, maybe without a lease yet
        assert queued.returncode == 2 and "Submitted" not in queued.stdout, queued.stdout + queued.stderr
        assert queued.stderr.count("\n") == 1 and "Traceback" not in queued.stderr
        # whichever it finds first, the queued jobs or the lease of the one running: the way out stops both
        assert queued.stderr.startswith("error: run dup ") and queued.stderr.rstrip().endswith(
            f"scancel {' '.join(jobs)}"), queued.stderr

        def lease_of_the_training_job():
            path = run / "lease.json"
            lease = json.loads(path.read_text()) if path.is_file() else {}
            return lease.get("job_id") == jobs[-1] and lease  # the training job's (the tokenizer job's is brief)

        lease = wait_for(lease_of_the_training_job, 120, "the training job of run dup to take its lease")
        held = launch(base, *RUN)
        assert held.returncode == 2 and held.stderr.count("\n") == 1 and "Traceback" not in held.stderr
        assert held.stderr.startswith(f"error: run dup is in use by Slurm job {lease['job_id']} (its lease "), held.stderr
        assert f"stop it: scancel {lease['job_id']}" in held.stderr
        recorded = (run / "slurm" / "jobs.jsonl").read_text().splitlines()
        assert [json.loads(line)["job_id"] for line in recorded] == jobs  # no third job was submitted
    finally:
        subprocess.run(["scancel", *jobs], timeout=30)
