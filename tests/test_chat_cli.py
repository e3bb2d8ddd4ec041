import os
import subprocess
import sys
import time
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


def test_reply_text_renders_tool_calls_as_gsm8k_writes_them(small_tokenizer):
    from nanochat.chat_text import ReplyText

    tok = small_tokenizer
    start, end, out, out_end = (tok.encode_special(f"<|{n}|>") for n in ("python_start", "python_end",
                                                                           "output_start", "output_end"))

    def render(*pieces):
        ids = [t for p in pieces for t in ([p] if isinstance(p, int) else tok.encode(p))]
        text = ReplyText(tok)
        return "".join(text.push(t) for t in ids) + text.finish()

    assert render("is ", start, "3*4", end, out, "12", out_end, "12.") == "is <<3*4=12>>12."
    assert render("is ", start, "3/0", end, " so") == "is <<3/0>> so"  # the calculator gave no answer
    assert render(start, "3/0", end) == "<<3/0>>"  # ... and the reply ended there
    assert render("is ", start, "3*4") == "is <<3*4>>"  # cut off inside the call (max_tokens, a stop)
    assert render("is ", start, "3*4", end, out, "1") == "is <<3*4=1>>"  # ... or inside its answer
    cafe = tok.encode("café")
    assert render(*cafe) == "café"


def _env(tmp_path, **extra):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "elsewhere"), "HOME": str(tmp_path / "home"), **extra}
    env.pop("XDG_STATE_HOME", None)
    return env


def test_the_launchers_words_choose_the_run(run_folder, tmp_path):
    """The run is not under $NANOCHAT_BASE_DIR/runs: found with runs_root= as the launcher takes it."""
    runs = str(run_folder.parent)
    for words in (["runs_root=" + runs], ["runs_root=" + runs, "run_name=tiny-d2", "stage=base"],
                  ["tiny-d2", "--runs-root", runs], ["--stage", "base", "runs_root=" + runs]):
        result = subprocess.run([sys.executable, "-m", "nanochat.chat_cli", *words, "-p", "The", "--max-tokens", "2"],
                                capture_output=True, text=True, env=_env(tmp_path), timeout=120)
        assert result.returncode == 0 and "step 3" in result.stderr, (words, result.stderr)
    for words, message in ((["depth=4"], "depth=4: not a way to choose the model"),
                           (["--run", "tiny-d2", "run_name=other"], "the run is already 'tiny-d2'"),
                           (["runs_root="], "no value")):
        result = subprocess.run([sys.executable, "-m", "nanochat.chat_cli", *words, "-p", "x"], capture_output=True,
                                text=True, env=_env(tmp_path), timeout=120)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_the_hint_at_start_and_no_history_from_a_pipe(run_folder, tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanochat.chat_cli", "--max-tokens", "2"], input="The\nquit\n",
                            capture_output=True, text=True, env=_env(tmp_path, NANOCHAT_BASE_DIR=str(tmp_path)),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Type 'clear' for a new conversation, 'quit' or Ctrl-D to leave" in result.stderr
    assert not (tmp_path / "home").exists()  # piped lines are not history


def test_line_editing_and_history_in_a_terminal(run_folder, tmp_path):
    """In a pseudo-terminal the up arrow recalls earlier lines (plain input() would read it as '^[[A'), and the
    lines are kept, for the owner only, in ~/.local/state/nanochat/chat_history."""
    import pty
    import select

    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.chat_cli", "--max-tokens", "2"], stdin=terminal,
                            stdout=terminal, stderr=terminal, env=_env(tmp_path, NANOCHAT_BASE_DIR=str(tmp_path),
                                                                       TERM="xterm"), close_fds=True)
    os.close(terminal)
    screen = b""

    def until_prompts(n):
        nonlocal screen
        deadline = time.monotonic() + 120
        while screen.count(b"User: ") < n:
            assert time.monotonic() < deadline and proc.poll() is None, screen.decode(errors="replace")
            if select.select([controller], [], [], 0.5)[0]:
                screen += os.read(controller, 4096)

    try:
        until_prompts(1)
        os.write(controller, b"The capital\r")
        until_prompts(2)
        os.write(controller, b"Paris\r")
        until_prompts(3)
        os.write(controller, b"\x1b[A\x1b[A\r")  # up arrow twice, Enter: the first line again
        until_prompts(4)
        os.write(controller, b"quit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    history = tmp_path / "home" / ".local" / "state" / "nanochat" / "chat_history"
    assert history.read_text().splitlines() == ["The capital", "Paris", "The capital", "quit"]
    assert history.stat().st_mode & 0o777 == 0o600
    assert b"history in " + str(history).encode() in screen and b"^[[A" not in screen
