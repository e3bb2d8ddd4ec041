"""End to end: mid_train, sft, rl and the chat evaluations on a tiny base model, the report at the end, and exact resume of
sft and rl after SIGKILL at a random step (upstream cannot resume RL at all)."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from nanochat.preemption import EXIT_REQUEUE

from test_base_train import base  # noqa: F401  (the shared tokenizer fixture)
from test_resume import TIMING, kill_when

SMALL = ["depth=2", "max_seq_len=256", "device_batch_size=4", "total_batch_size=1024", "sample_every=-1",
         "sft.num_iterations=6", "sft.eval_every=3", "sft.eval_tokens=2048", "sft.chat_eval_every=3",
         "sft.chat_eval_examples=4", "mid_train.num_iterations=2", "mid_train.eval_every=-1", "sft.simple_spelling=40",
         "sft.spelling_bee=40", "sft.arithmetic=40", "rl.num_iterations=4", "rl.examples_per_step=2",
         "rl.num_samples=2", "rl.device_batch_size=2", "rl.max_new_tokens=12", "rl.eval_every=2",
         "rl.eval_examples=2", "rl.task=arithmetic", "chat_eval.max_examples=3", "chat_eval.max_new_tokens=12",
         "chat_eval.generated_examples=3", "chat_eval.tasks=[ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee]",
         "save_every=1"]


def launch(base, name, *overrides, **env):
    tokenizer = base / "runs" / "shared" / "tok_train" / "tokenizer"
    return [sys.executable, "-m", "experiments.launch", *SMALL, f"run_name={name}", f"tokenizer={tokenizer}",
            *overrides], {**os.environ, "NANOCHAT_BASE_DIR": str(base), **env}


def run_ok(base, name, *overrides):
    cmd, env = launch(base, name, *overrides)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def model(base):  # noqa: F811
    """A tiny base model, fine-tuned once: the inputs of the resume tests."""
    result = run_ok(base, "chat", "stages=[base_train,sft]", "num_iterations=6", "eval_every=-1")
    assert "optimizer warm-started from" in result.stdout  # base_train kept its optimizer state for sft
    return base / "runs" / "chat"


def summary(run, stage) -> dict:
    return json.loads((run / stage / "summary.json").read_text())


@pytest.mark.slow
def test_chat_pipeline_writes_every_figure_and_the_report(base):  # noqa: F811
    run_ok(base, "mid", "stages=[base_train,mid_train,sft,chat_eval_sft,rl,chat_eval_rl]", "num_iterations=6",
           "eval_every=-1")
    model = base / "runs" / "mid"
    assert summary(model, "mid_train")["step"] == 2
    sft = summary(model, "sft")
    assert sft["step"] == 6 and sft["val_bpb"] > 0 and len(sft["weights_sha256"]) == 64
    assert "mid_train" in sft["source"]  # sft starts from the mid-trained model when there is one
    quick = [row for row in map(json.loads, (model / "sft" / "metrics.jsonl").read_text().splitlines())
             if "MMLU" in row]
    assert [row["step"] for row in quick] == [0, 3, 6] and all(0 <= row["ARC-Easy"] <= 1 for row in quick)
    rl = summary(model, "rl")
    assert rl["step"] == 4 and "pass@1" in rl and "pass@2" in rl and 0 <= rl["reward"] <= 1
    for stage in ("chat_eval_sft", "chat_eval_rl"):
        evaluation = summary(model, stage)
        for task in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"):
            assert 0 <= evaluation[task] <= 1
        assert evaluation["ARC-Easy examples"] == 3 and evaluation["task_data"] == "fixture"
        assert 0 <= evaluation["assistant_end_rate"] <= 1 and evaluation["assistant_end_prompts"] == 20
        assert evaluation["chatcore"] is not None
    report = (model / "report.md").read_text()
    assert "| ChatCORE" in report and "embedded fixture, not comparable" in report
    assert (model / "report" / "loss.png").is_file()


def finished(base, name, stage) -> tuple[dict, list]:
    path = base / "runs" / name / stage
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (path / "metrics.jsonl").read_text().splitlines()]
    return summary(base / "runs" / name, stage), rows


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_sigkill_then_resume_gives_identical_weights(base, model, stage):  # noqa: F811
    inputs = [f"base_checkpoint={model / 'base_train'}", f"sft_checkpoint={model / 'sft'}", f"stages=[{stage}]"]
    run_ok(base, f"{stage}-straight", *inputs)
    expected_summary, expected_rows = finished(base, f"{stage}-straight", stage)

    seed = int(os.environ.get("RESUME_TEST_SEED", random.randrange(1 << 30)))
    print(f"RESUME_TEST_SEED={seed}")
    kill_step = random.Random(seed).randrange(1, expected_summary["step"])
    checkpoints = base / "runs" / f"{stage}-killed" / stage / "checkpoints"
    cmd, env = launch(base, f"{stage}-killed", *inputs)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, lambda: len(list(checkpoints.glob("step_*/COMPLETE"))) >= 1 and
                     max(int(p.parent.name[5:]) for p in checkpoints.glob("step_*/COMPLETE")) >= kill_step)
    run_ok(base, f"{stage}-killed", *inputs)

    resumed_summary, rows = finished(base, f"{stage}-killed", stage)
    assert resumed_summary["resumes"] == 1
    assert resumed_summary["weights_sha256"] == expected_summary["weights_sha256"]
    assert rows == expected_rows


@pytest.mark.slow
def test_usr2_stops_chat_eval_between_examples_and_the_rerun_skips_finished_tasks(base, model):  # noqa: F811
    inputs = [f"sft_checkpoint={model / 'sft'}", "stages=[chat_eval_sft]", "chat_eval.tasks=[ARC-Easy,GSM8K]",
              "chat_eval.max_examples=-1", "chat_eval.max_new_tokens=48"]
    cmd, env = launch(base, "stopped-eval", *inputs, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("chat_eval_sft: ARC-Easy"):
            break
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE and "chat_eval_sft stopped during GSM8K" in stderr
    stage = base / "runs" / "stopped-eval" / "chat_eval_sft"
    assert not (stage / "summary.json").exists()
    assert set(json.loads((stage / "progress.json").read_text())) == {
        "requeues", "preemptions", "time_limits", "node_failures", "slurm", "ARC-Easy", "ARC-Easy examples"}
    done = run_ok(base, "stopped-eval", *inputs)
    assert "chat_eval_sft: ARC-Easy" not in done.stdout  # finished tasks are not evaluated again
    result = summary(base / "runs" / "stopped-eval", "chat_eval_sft")
    assert result["GSM8K examples"] == 12 and 0 <= result["ARC-Easy"] <= 1


@pytest.mark.slow
def test_two_ranks_score_what_one_rank_scores(base, model):  # noqa: F811
    inputs = [f"sft_checkpoint={model / 'sft'}", "stages=[chat_eval_sft]", "chat_eval.tasks=[ARC-Easy,MMLU,GSM8K]",
              "chat_eval.max_examples=7", "chat_eval.batch_size=2"]
    run_ok(base, "eval-1", *inputs)
    run_ok(base, "eval-2", *inputs, "nproc=2")
    one, two = summary(base / "runs" / "eval-1", "chat_eval_sft"), summary(base / "runs" / "eval-2", "chat_eval_sft")
    assert two["world_size"] == 2 and two["MMLU examples"] == 7
    for key in ("ARC-Easy", "MMLU", "GSM8K", "assistant_end_rate"):
        assert two[key] == pytest.approx(one[key]), key
    assert one["chatcore"] is None and two["chatcore"] is None  # over three of ChatCORE's five tasks: none
