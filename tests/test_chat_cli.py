import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from nanochat.chat_cli import chat_prompt
from nanochat.chat_text import StreamDecoder
from nanochat.checkpoint import CheckpointManager
from nanochat.gpt import GPT, GPTConfig


@pytest.fixture
def run_folder(tmp_path, small_tokenizer):
    """A run with a tokenizer and a (random) base model, as the pipeline lays it out."""
    run = tmp_path / "runs" / "tiny-d2"
    small_tokenizer.save(run / "tok_train" / "tokenizer")
    config = GPTConfig(sequence_len=64, vocab_size=400, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    CheckpointManager(run / "base_train" / "checkpoints").save(
        3, GPT.build(config).state_dict(), {}, {}, {"model_config": asdict(config)})
    (run / "config.yaml").write_text("depth: 2\n")
    return run


def cli(*args, base):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    return subprocess.run([sys.executable, "-m", "nanochat.chat_cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_one_shot_prompt_on_the_newest_run(run_folder, tmp_path):
    result = cli("-p", "The capital", "--max-tokens", "5", "--temperature", "0", base=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital") and "base model" in result.stderr and "step 3" in result.stderr


def test_missing_things_are_one_line_errors(run_folder, tmp_path):
    for args, message in ((["--stage", "sft"], "has no finished checkpoint for stage 'sft'"),
                          (["--run", "nope"], "no run named 'nope'")):
        result = cli(*args, "-p", "x", base=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_stream_decoder_waits_for_whole_characters(small_tokenizer):
    ids = small_tokenizer.encode("café 東京")
    decoder = StreamDecoder(small_tokenizer)
    assert "".join(decoder.push(t) for t in ids) == "café 東京"


def test_chat_prompt_layout(small_tokenizer):
    tok = small_tokenizer
    ids = chat_prompt(tok, [("user", tok.encode("hi"))])
    assert tok.decode(ids) == "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>"
