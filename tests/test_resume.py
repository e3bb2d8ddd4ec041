"""Exact resume: base training killed with SIGKILL at random points (one of them in the middle of a checkpoint
save) and restarted with the same command ends with the same weights and metrics as an uninterrupted run."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from test_base_train import base  # noqa: F401  (the shared tokenizer fixture)

# 1,024-token steps (~0.15 s on 2 cores, 4x fewer tokens than the embedded preset's): these tests are about
# stopping and resuming, and their time is the restarts'
ARGS = ["stages=[base_train]", "depth=2", "num_iterations=12", "save_every=2", "eval_every=4", "eval_tokens=4096",
        "sample_every=-1", "max_seq_len=128", "total_batch_size=1024"]
TIMING = {"dt", "tok_per_sec", "mfu", "time", "wall"}


def command(base, name):
    tokenizer = base / "runs" / "shared" / "tok_train" / "tokenizer"
    return [sys.executable, "-m", "experiments.launch", *ARGS, f"run_name={name}", f"tokenizer={tokenizer}"]


def env(base, **extra):
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base), **extra}


def results(base, name):
    stage = base / "runs" / name / "base_train"
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return json.loads((stage / "summary.json").read_text()), rows


def last_step(base, name) -> int:
    path = base / "runs" / name / "base_train" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else -1


def kill_when(proc, condition, timeout=300):
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_identical_weights(base):  # noqa: F811
    subprocess.run(command(base, "straight"), env=env(base), check=True, capture_output=True)
    expected_summary, expected_rows = results(base, "straight")

    seed = int(os.environ.get("RESUME_TEST_SEED", random.randrange(1 << 30)))
    print(f"RESUME_TEST_SEED={seed}")
    # from step 3 on, the step-2 checkpoint exists: a run whose every kill came before any checkpoint (kills at
    # steps 1 and 2) would end with nothing to resume from, and this test is about resuming
    kill_steps = sorted(random.Random(seed).sample(range(3, 12), 2))
    ckpt_dir = base / "runs" / "killed" / "base_train" / "checkpoints"
    kills = 0
    for step in kill_steps:  # SIGKILL once training has logged `step`
        proc = subprocess.Popen(command(base, "killed"), env=env(base), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        kills += kill_when(proc, lambda s=step: last_step(base, "killed") >= s)
    # SIGKILL in the middle of a save: the test hook holds the writer after its files, before the marker
    proc = subprocess.Popen(command(base, "killed"), env=env(base, NANOCHAT_TEST_CKPT_PAUSE_S="3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    torn = kill_when(proc, lambda: any(ckpt_dir.glob(".step_*.tmp/model.pt")))
    assert torn and kills >= 1, "the kills must land while training runs"
    finish = subprocess.run(command(base, "killed"), env=env(base), capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert "skipping incomplete checkpoint" in finish.stdout

    summary, rows = results(base, "killed")
    assert summary["weights_sha256"] == expected_summary["weights_sha256"]
    assert summary["resumes"] >= 1 and summary["requeues"] == 0
    assert rows == expected_rows  # the same metrics, timings aside, with nothing logged twice
    # a finished stage keeps its final weights only (its optimizer state too when sft follows in the run)
    assert [p.name for p in ckpt_dir.glob("step_*")] == [f"step_{summary['step']:06d}"]
    assert not list(ckpt_dir.glob("*/optim_rank*.pt"))


@pytest.mark.slow
def test_an_fp16_run_resumes_with_the_loss_scale_it_had(base):  # noqa: F811
    """fp16 (pre-Ampere GPUs; here forced on the CPU) scales the loss: a resumed run goes on from the scaler's state
    (its scale and how many clean steps since the last change), not from the default."""
    cmd = command(base, "fp16") + ["max_seq_len=32", "total_batch_size=256", "save_every=1", "eval_every=-1",
                                   "num_iterations=3"]
    fp16 = env(base, NANOCHAT_DTYPE="float16")
    checkpoints = base / "runs" / "fp16" / "base_train" / "checkpoints"
    killed = subprocess.Popen(cmd, env=fp16, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(killed, lambda: (checkpoints / "step_000002" / "COMPLETE").exists())
    resumed = subprocess.run(cmd, env=fp16, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from step_000002" in resumed.stdout, resumed.stderr
    import torch

    state = torch.load(checkpoints / "step_000003" / "state_rank0.pt", weights_only=True)
    assert state["scaler"]["_growth_tracker"] == 3  # 2 before the kill + 1 after; a fresh scaler would have 1


@pytest.mark.slow
def test_a_resumed_run_logs_plain_progress_lines_timed_by_its_own_steps(base):  # noqa: F811
    """Into a log (a pipe, as Slurm's): plain lines, every 10 steps and the last; the ETA comes from the steps this
    process trained after its first, so it is about (steps left) / (the rate shown); on the CPU there is no MFU
    (no peak FLOP/s on record) rather than a made-up 0.0%."""
    checkpoints = base / "runs" / "progress" / "base_train" / "checkpoints"
    killed = subprocess.Popen(command(base, "progress"), env=env(base), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    assert kill_when(killed, lambda: (checkpoints / "step_000004" / "COMPLETE").exists())
    resumed = subprocess.run(command(base, "progress"), env=env(base), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    start = int(re.search(r"resumed from step_\d+ \(step (\d+)/12\)", resumed.stdout)[1])
    assert 4 <= start < 10 and "\r" not in resumed.stdout and "mfu" not in resumed.stdout
    lines = {int(step): figures for step, *figures in re.findall(
        r"^base_train step (\d+)/12 \([\d.]+%\)(?: \| ([\d.]+) (step/s|s/step))?(?: \| eta (\d+)s)? \| "
        r"loss [\d.]+ \| lrm [\d.]+ \| [\d,]+ tok/s$", resumed.stdout, re.M)}
    # every 10 steps and the last; a slow machine adds one every 30 s
    assert {10, 12} <= set(lines) and all(step > start for step in lines)
    rate, unit, eta = lines[10]
    steps_per_s = float(rate) if unit == "step/s" else 1 / float(rate)
    assert int(eta) == pytest.approx(2 / steps_per_s, abs=1)
    assert lines[12][2] == ""  # the last line has no ETA: nothing is left
