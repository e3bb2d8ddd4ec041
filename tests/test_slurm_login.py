"""The login node's lines against the real local Slurm cluster (slurm/dev/up.sh): pytest -m slurm."""

import os
import re
import subprocess
import sys

import pytest

from slurm_fixtures import slurm_cluster, wait_state  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm


def test_the_log_line_names_the_file_with_the_jobs_error(slurm_cluster, tmp_path):  # noqa: F811
    # tokenizer=PATH is left to the job (a sweep's own job makes it): here it is missing, so the job fails
    missing = tmp_path / "no-tokenizer"
    command = [sys.executable, "-m", "experiments.launch", "+cluster=localslurm", "run_name=bad",
               "stages=[base_train]", "depth=2", f"tokenizer={missing}", f"runs_root={tmp_path / 'runs'}"]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    job = int(re.search(r"^Submitted job (\d+)", result.stdout).group(1))
    errors = re.search(r"^    log: (\S+) \(errors\), (\S+) \(output\)$", result.stdout, re.MULTILINE)
    assert errors and errors.group(1) == str(tmp_path / "runs" / "bad" / "slurm" / f"{job}_0_log.err"), result.stdout
    wait_state(job, "FAILED", timeout=180)
    assert f"tokenizer={missing} holds no tokenizer" in open(errors.group(1)).read()
