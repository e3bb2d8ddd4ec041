"""Run folders written by an earlier version (tests/fixtures/old_runs, see its README) still resume and chat."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "old_runs"
COMMON = ["depth=2", "aspect_ratio=32", "head_dim=32", "max_seq_len=64", "device_batch_size=4",
          "total_batch_size=512", "num_iterations=6", "save_every=2", "eval_every=3", "eval_tokens=1024",
          "tok_train.vocab_size=512", "tok_train.max_chars=400000", "sft.num_iterations=3", "sft.eval_every=-1",
          "sft.chat_eval_every=-1", "sft.simple_spelling=20", "sft.spelling_bee=20", "sft.arithmetic=40",
          "sft.init_lr_frac=1.0"]  # the default when the fixture was written (upstream's HEAD has 0.8 since)


@pytest.fixture
def base(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "runs", ignore=shutil.ignore_patterns("README.md"))
    return tmp_path


def run(module, *args, base):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_an_interrupted_base_train_resumes_and_finishes(base):
    """Its checkpoint, optimizer state and dataloader state (saved mid-way through a tokenizer batch, which today's
    loader never does) load, and the run finishes on the old run's loss curve. Not on its weights to the bit any
    more: since issue 17 the loader refills by whole tokenizer batches and the optimizer rounds as upstream's, so
    steps 4-6 compute what the code that wrote the fixture did not (exact resume within one version is
    tests/test_resume.py's)."""
    refused = run("experiments.launch", *COMMON, "run_name=old-base", "stages=[base_train]", base=base)
    assert refused.returncode == 2 and "Add fused_loss=false to resume it as it began" in refused.stderr
    # the loss it began with (the row-chunked one came later)
    result = run("experiments.launch", *COMMON, "run_name=old-base", "stages=[base_train]", "fused_loss=false",
                 base=base)
    assert result.returncode == 0, result.stderr
    assert "resumed from step_000003 (step 3/6)" in result.stdout
    resumed = json.loads((base / "runs" / "old-base" / "base_train" / "summary.json").read_text())
    # old-chat's base_train ran the same 6 steps without a stop, on the same tokenizer, with the earlier code
    straight = json.loads((base / "runs" / "old-chat" / "base_train" / "summary.json").read_text())
    assert resumed["step"] == 6 and resumed["resumes"] == 1
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-3)  # 6.23651 vs 6.23672 on 2026-12-07


@pytest.mark.slow
def test_an_old_chat_model_chats(base):
    for stage, kind in (("sft", "chat model"), ("base", "base model")):
        result = run("nanochat.chat_cli", "--run", "old-chat", "--stage", stage, "-p", "Hello", "--max-tokens", "4",
                     "--temperature", "0", base=base)
        assert result.returncode == 0, result.stderr
        assert kind in result.stderr and result.stdout.strip()
