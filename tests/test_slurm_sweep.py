"""A tiny IsoFLOP sweep (2 budgets x 3 depths) on the real local Slurm cluster (slurm/dev/up.sh): the tokenizer job,
then two job arrays that start after it; every run ends at its budget; a rerun submits nothing; the analysis runs
on what the sweep wrote. A tiny -m sweep: one job array, the prompt back before any run ends. Run with the cluster
up: pytest -m slurm."""

import json
import os
import subprocess
import sys
import time

import pytest

from slurm_fixtures import job_field, preempt, slurm_cluster, wait_for, wait_state  # noqa: F401 (fixture)
from test_multirun import TINY_MULTIRUN
from test_sweep import GROUP0, GROUP1, TINY_SWEEP

pytestmark = pytest.mark.slurm


def launch(base, *args, module="experiments.launch"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NANOCHAT_BASE_DIR": str(base)})


def test_a_tiny_isoflop_sweep_runs_as_arrays_and_is_analyzed(slurm_cluster, tmp_path):  # noqa: F811
    base, started = tmp_path / "base", time.time()
    sweep = base / "runs" / "tiny"
    first = launch(base, *TINY_SWEEP, "+cluster=localslurm")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].endswith(" (4 tasks)") and lines[1].endswith(" (2 tasks)"), first.stdout
    arrays = [int(line.split()[2]) for line in lines[:2]]
    print(f"\nsubmitted in {time.time() - started:.1f}s:\n{first.stdout}")

    for name in GROUP0 + GROUP1:
        wait_for((sweep / name / "base_train" / "summary.json").is_file, 240, f"{name} to finish")
    for array, runs in zip(arrays, (GROUP0, GROUP1)):
        for index in range(len(runs)):
            wait_state(f"{array}_{index}", "COMPLETED", timeout=60)
    print(f"all 6 runs done {time.time() - started:.0f}s after submission")
    manifest = json.loads((sweep / "manifest.json").read_text())
    for entry in manifest["runs"]:
        summary = json.loads((sweep / entry["run_name"] / "base_train" / "summary.json").read_text())
        assert summary["step"] == entry["plan"]["steps"] and summary["depth"] == entry["depth"]
        # the horizon is the budget rounded to whole steps: off by at most half a step's FLOPs
        assert abs(summary["flops"] - entry["flops_budget"]) <= summary["flops"] / summary["step"] / 2

    again = launch(base, *TINY_SWEEP, "+cluster=localslurm")
    assert again.returncode == 0 and again.stdout == f"Nothing to submit: 6 of 6 runs done ({sweep})\n"
    assert len(json.loads((sweep / "manifest.json").read_text())["submissions"]) == 1

    status = launch(base, str(sweep), module="experiments.status")
    assert status.returncode == 0 and status.stdout.startswith(f"sweep {sweep} (isoflop): 6 of 6 runs done")
    assert status.stdout.count("COMPLETED") == 6

    analysis = launch(base, str(sweep), "--out", str(tmp_path / "fits"), module="scaling.analyze")
    assert analysis.returncode == 0, analysis.stderr
    fits = json.loads((tmp_path / "fits" / "fits.json").read_text())
    assert fits["inputs"]["flops_per_param_token"] > 0


def test_an_array_element_requeues_itself_and_resumes(slurm_cluster, tmp_path):  # noqa: F811
    base = tmp_path / "base"
    run = base / "runs" / "rq" / "rq-5e11-d2" / "base_train"
    first = launch(base, *TINY_SWEEP, "run_name=rq", "depths=[2,3]", "flops_budgets=[5e11]", "+cluster=localslurm")
    assert first.returncode == 0 and first.stdout.splitlines()[0].endswith(" (2 tasks)"), first.stdout + first.stderr
    array = first.stdout.split()[2]

    def step() -> int:
        log = run / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return max([r["step"] for r in rows if "loss" in r], default=-1)

    wait_for(lambda: step() >= 5, 180, "step 5 of rq-5e11-d2")
    subprocess.run(["scancel", "--signal=USR2", f"{array}_0"], check=True, timeout=30)
    wait_for(lambda: step() >= 40 and job_field(f"{array}_0", "Restarts") == "1", 240, "step 40 after the requeue")
    preempt(f"{array}_0")  # then a SIGTERM preemption of the same element
    wait_for((run / "summary.json").is_file, 240, "rq-5e11-d2 to finish after its requeues")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 138 and summary["requeues"] == 2
    assert (summary["time_limits"], summary["preemptions"], summary["node_failures"]) == (1, 1, 0)
    assert wait_state(f"{array}_0", "COMPLETED", timeout=60)


def test_a_tiny_multirun_runs_as_a_job_array(slurm_cluster, tmp_path):  # noqa: F811
    base, names = tmp_path / "base", ["mr-matrix_lr0.01", "mr-matrix_lr0.02"]
    args = ["-m", "+cluster=localslurm", *TINY_MULTIRUN, "depth=2", "matrix_lr=0.01,0.02"]
    summaries = [base / "runs" / "mr" / name / "base_train" / "summary.json" for name in names]
    first = launch(base, *args)
    assert first.returncode == 0, first.stderr
    assert not any(s.exists() for s in summaries)  # submitted, not waited for: the runs start after the tokenizer
    assert first.stdout.splitlines()[0].endswith(" (2 tasks)"), first.stdout
    array = first.stdout.split()[2]
    for summary, index in zip(summaries, range(2)):
        wait_for(summary.is_file, 120, f"{summary.parent.parent.name} to finish")
        assert json.loads(summary.read_text())["step"] == 3
        wait_state(f"{array}_{index}", "COMPLETED", timeout=60)
    again = launch(base, *args)
    assert again.returncode == 0 and again.stdout.startswith("Nothing to submit: 2 of 2 runs done")
