import json
import os
import subprocess
import sys

import pytest


def launch(*overrides, env_base, **extra_env):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(env_base), **extra_env}
    return subprocess.run([sys.executable, "-m", "experiments.launch", *overrides], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("override, message", [
    ("dept=3", "unknown key 'dept'; valid keys: "),
    ("depth=abc", "could not be converted to Integer"),
    ("tok_train.vocab=3", "unknown key 'vocab' in TokTrainConfig; valid keys: vocab_size"),
    ("stages=[tok_train,nope]", "unknown stage(s) ['nope']"),
    ("dataset=nope", "unknown dataset='nope'"),
    ("task_data=hub", "SmolTalk is not staged: run `python -m tasks.stage`"),  # before any stage starts
    ("rl.task=nope", "rl.task='nope'; valid: gsm8k, arithmetic"),
    ("chat_eval.tasks=[MMLU,Nope]", "chat_eval.tasks: unknown task 'Nope'"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, override, message):
    result = launch(override, env_base=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_missing_tokenizer_names_the_stage_to_run(tmp_path):
    result = launch("stages=[tok_eval]", env_base=tmp_path)
    assert result.returncode == 2 and "run the tok_train stage first" in result.stderr


@pytest.mark.slow
def test_embedded_tokenizer_stages_offline_then_skip(tmp_path):
    dead_proxy = "http://127.0.0.1:9"  # any network use would fail
    first = launch("stages=[tok_train,tok_eval]", env_base=tmp_path, http_proxy=dead_proxy, https_proxy=dead_proxy)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "embedded-d4"
    tok = json.loads((run / "tok_train" / "summary.json").read_text())
    assert tok["vocab_size"] == 8192 and tok["train_chars"] > 5_000_000
    assert (run / "tok_train" / "tokenizer" / "tokenizer.pkl").is_file()
    evals = json.loads((run / "tok_eval" / "summary.json").read_text())
    assert evals["texts"]["embedded-val"]["ratio"] > 3.0  # English prose compresses to >3 bytes per token
    assert evals["references_missing"] == ["gpt2", "cl100k_base"]
    again = launch("stages=[tok_train,tok_eval]", env_base=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2
