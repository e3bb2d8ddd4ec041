"""Chat evaluation scoring with models whose answers are known: categorical tasks score the letter the model
prefers at the answer position, among the offered letters only; the turn-ending check sees <|assistant_end|>."""

import pytest
import torch

from nanochat.chat_scoring import centered, chatcore, ends_turns, evaluate_task
from nanochat.stages.chat_eval import _chatcore_text
from tasks.arc import ARC
from tasks.mmlu import MMLU


class FixedTokenModel(torch.nn.Module):
    """Prefers one token (and, second, another). With `at`, only at positions whose input is that token (the
    answer position of a prompt) and a `decoy` token everywhere else, so reading the wrong position shows."""

    def __init__(self, vocab_size: int, token: int, runner_up: int | None = None, at: int | None = None,
                 decoy: int | None = None):
        super().__init__()
        self.vocab_size, self.token, self.runner_up, self.at, self.decoy = vocab_size, token, runner_up, at, decoy
        self.config = type("Config", (), {"sequence_len": 1024, "n_layer": 1, "n_kv_head": 1, "n_head": 1,
                                          "n_embd": 4})()
        self.compute_dtype = torch.float32

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, targets=None, kv_cache=None, loss_reduction="mean"):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[..., self.token] = 2.0
        if self.runner_up is not None:
            logits[..., self.runner_up] = 1.0
        if self.at is not None:
            elsewhere = ids != self.at
            logits[elsewhere] = 0.0
            logits[..., self.decoy][elsewhere] = 3.0
        if kv_cache is not None:
            kv_cache.advance(ids.shape[1])
        return logits


def letter_share(task, letter: str) -> float:
    answers = [task[i]["messages"][-1]["content"] for i in range(len(task))]
    return sum(a == letter for a in answers) / len(answers)


@pytest.mark.parametrize("make_task", [lambda: ARC("ARC-Easy", source="fixture"),
                                       lambda: MMLU("all", source="fixture")])
@pytest.mark.parametrize("letter", ["A", "B", "C"])
def test_categorical_accuracy_is_the_share_of_the_preferred_letter(small_tokenizer, make_task, letter):
    task = make_task()
    decoy = "D" if letter != "D" else "A"
    model = FixedTokenModel(small_tokenizer.get_vocab_size(), small_tokenizer.encode(letter)[0],
                            at=small_tokenizer.encode_special("<|assistant_start|>"),
                            decoy=small_tokenizer.encode(decoy)[0])
    result = evaluate_task(model, small_tokenizer, task, batch_size=5)
    assert result["total"] == len(task)
    assert result["accuracy"] == pytest.approx(letter_share(task, letter))


def test_only_offered_letters_count(small_tokenizer):
    """A model that prefers "Z" (never offered) falls back to its runner-up among the offered letters."""
    task = ARC("ARC-Easy", source="fixture")
    model = FixedTokenModel(small_tokenizer.get_vocab_size(), small_tokenizer.encode("Z")[0],
                            runner_up=small_tokenizer.encode("B")[0])
    assert evaluate_task(model, small_tokenizer, task)["accuracy"] == pytest.approx(letter_share(task, "B"))


def test_max_examples_and_stop(small_tokenizer):
    task = ARC("ARC-Easy", source="fixture")
    model = FixedTokenModel(small_tokenizer.get_vocab_size(), small_tokenizer.encode("A")[0])
    assert evaluate_task(model, small_tokenizer, task, max_examples=5)["total"] == 5
    asked = []
    assert evaluate_task(model, small_tokenizer, task, batch_size=4,
                         should_stop=lambda: asked.append(1) or len(asked) > 2) is None
    assert len(asked) == 3  # stopped at the third batch boundary


def test_a_labelled_evaluation_shows_its_progress_in_a_log_and_where_it_stopped(small_tokenizer, capsys):
    task = ARC("ARC-Easy", source="fixture")
    model = FixedTokenModel(small_tokenizer.get_vocab_size(), small_tokenizer.encode("A")[0])
    evaluate_task(model, small_tokenizer, task, batch_size=4, progress_label="chat_eval_sft ARC-Easy")
    [line] = capsys.readouterr().out.splitlines()  # quick: no line before the last
    n = len(task)
    assert line.startswith(f"chat_eval_sft ARC-Easy {n}/{n} (100.0%) | ") and line.endswith(" example/s")
    asked = []
    evaluate_task(model, small_tokenizer, task, batch_size=4, progress_label="chat_eval_sft ARC-Easy",
                  should_stop=lambda: asked.append(1) or len(asked) > 2)
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"chat_eval_sft ARC-Easy {8:0{len(str(n))}d}/{n} ({800 / n:.1f}%) | ")  # 2 batches of 4


def test_ends_turns_sees_assistant_end(small_tokenizer):
    vocab = small_tokenizer.get_vocab_size()
    ender = FixedTokenModel(vocab, small_tokenizer.encode_special("<|assistant_end|>"))
    rambler = FixedTokenModel(vocab, small_tokenizer.encode("a")[0])
    assert ends_turns(ender, small_tokenizer, ["Hi!", "Who are you?"], max_tokens=8) == [True, True]
    assert ends_turns(rambler, small_tokenizer, ["Hi!"], max_tokens=8) == [False]


def test_chatcore_is_the_mean_centered_accuracy_over_upstreams_five_tasks():
    assert centered(0.25, 0.25) == 0 and centered(1.0, 0.25) == 1
    baselines = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                 "SpellingBee": 0.0, "Arithmetic": 0.0}
    five = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 1.0, "GSM8K": 0.5, "HumanEval": 0.1}
    assert chatcore(five, baselines) == pytest.approx((0.5 + 0 + 1 + 0.5 + 0.1) / 5)
    # SpellingBee (and our Arithmetic) are reported beside ChatCORE, not averaged into it
    assert chatcore({**five, "SpellingBee": 1.0, "Arithmetic": 0.0}, baselines) == chatcore(five, baselines)
    # without one of the five there is no ChatCORE, as upstream: a mean over fewer tasks would not compare
    assert chatcore({"ARC-Easy": 0.625, "GSM8K": 0.5, "SpellingBee": 1.0}, baselines) is None
    assert chatcore({}, baselines) is None
    missing_two = {"ARC-Easy": 0.6, "MMLU": 0.3, "GSM8K": 0.5}
    assert _chatcore_text(None, missing_two) == "n/a (needs ARC-Challenge, HumanEval too)"
    assert _chatcore_text(0.21234, five) == "0.2123"
