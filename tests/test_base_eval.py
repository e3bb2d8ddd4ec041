"""base_eval end to end on a tiny trained model: bpb, CORE reported as not staged, samples; and a USR2 in the
middle of the bpb pass stops it at a batch boundary, after which the same command finishes the stage."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from nanochat.preemption import EXIT_REQUEUE

from test_base_train import base, train  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def trained(base):  # noqa: F811
    train(base, "ev", "eval_every=-1", "sample_every=-1")
    return base


def evaluate(base, *overrides):
    """The launcher for base_eval on run `ev` (later overrides win, as in Hydra)."""
    tokenizer = base / "runs" / "shared" / "tok_train" / "tokenizer"
    return [sys.executable, "-m", "experiments.launch", "stages=[base_eval]", "run_name=ev", "depth=2",
            "num_iterations=8", "eval_every=-1", "sample_every=-1", f"tokenizer={tokenizer}", *overrides]


@pytest.mark.slow
def test_usr2_stops_the_bpb_pass_then_the_rerun_finishes(trained):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(trained)}
    proc = subprocess.Popen(evaluate(trained, "eval_tokens=50000000"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("base_eval: val bpb over"):
            break
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_REQUEUE and "base_eval stopped during the val bpb pass" in stderr
    stage = trained / "runs" / "ev" / "base_eval"
    assert not (stage / "summary.json").exists()
    done = subprocess.run(evaluate(trained, "eval_tokens=8192"), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^base_eval val bpb (\d+)/\1 \(100\.0%\) \| [\d.]+ (batch/s|s/batch)$", done.stdout, re.M)
    summary = json.loads((stage / "summary.json").read_text())
    assert 0 < summary["val_bpb"] < 4 and summary["core_metric"] == "n/a (not staged)"
    assert len(summary["samples"]) == 5 and all(isinstance(s, str) for s in summary["samples"])
    assert summary["model_step"] == 8


@pytest.mark.slow
def test_missing_base_model_names_the_stage_to_run(base):  # noqa: F811
    result = subprocess.run(evaluate(base, "run_name=no-model"), capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(base)})
    assert result.returncode == 2 and "run base_train first" in result.stderr
