"""nanochat.loss_eval: bits per byte over a real tiny GPT, and the progress bar base_eval gives its batches."""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batches(vocab: int):
    generator = torch.Generator().manual_seed(0)
    while True:
        row = torch.randint(0, vocab, (2, 17), generator=generator)
        yield row[:, :-1], row[:, 1:]


def test_a_labelled_pass_shows_its_batches_in_a_log_and_where_it_stopped(capsys):
    vocab = 64
    model = GPT.build(GPTConfig(sequence_len=16, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                                window_pattern="L"), device="cpu")
    token_bytes = torch.ones(vocab, dtype=torch.int32)
    quiet = evaluate_bpb(model, batches(vocab), 3, token_bytes)
    assert capsys.readouterr().out == ""  # no label, no bar: the passes inside training stay quiet
    assert evaluate_bpb(model, batches(vocab), 3, token_bytes, progress_label="base_eval val bpb") == quiet
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("base_eval val bpb 3/3 (100.0%) | ") and line.endswith(" batch/s")
    asked = []
    assert evaluate_bpb(model, batches(vocab), 3, token_bytes, progress_label="base_eval val bpb",
                        should_stop=lambda: asked.append(1) or len(asked) > 2) is None
    assert capsys.readouterr().out.startswith("base_eval val bpb 2/3 (66.7%) | ")
