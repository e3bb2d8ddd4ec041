"""The login node's side: a submission and a status query import no torch (1.6 s of a 2.6 s submission, measured
on 2 cores), and what the GPU job will read is checked before anything is submitted, one line each."""

import json
import subprocess
import sys

import pytest

from nanochat.runs import Run

SUBMISSION_PATH = """
import sys
from experiments.config import load_config
from experiments.launch import main
from experiments.pipeline import prepare_run
import experiments.job, experiments.slurm, submitit  # what submit() imports to pickle the job
prepare_run(load_config(["+cluster=localslurm", "runs_root=" + sys.argv[1]]), submitting=True)
print("torch" in sys.modules)
"""


def no_torch(code: str, *args: str) -> None:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False", out


def test_a_submission_imports_no_torch(tmp_path):
    no_torch(SUBMISSION_PATH, str(tmp_path / "runs"))
    assert (tmp_path / "runs" / "embedded-d4" / "config.yaml").is_file()  # prepare_run did check and write


def test_status_imports_no_torch(tmp_path):
    run = Run(tmp_path / "r")
    run.root.mkdir()
    run.config_path.write_text("stages: [tok_train, base_train]\n")
    run.write_summary("tok_train", {})
    run.slurm_dir.mkdir()
    run.jobs_path.write_text(json.dumps({"job_id": "1", "kind": "gpu", "stages": ["base_train"],
                                         "stdout": "/x/1_0_log.out"}) + "\n")
    no_torch(f"""
import sys
from experiments.status import main
for args in (["{run.root}"], ["--all", "--runs-root", "{tmp_path}"]):
    main(args)
try:
    main(["--help"])
except SystemExit:
    pass
print("torch" in sys.modules)
""")
