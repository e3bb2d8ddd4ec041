"""sft's defaults are upstream's chat_sft at HEAD: the learning-rate schedule, Muon's momentum ramp, the initial
learning-rate fraction and the mixture; mid_train and the embedded preset keep mixtures of their own."""

import pytest

from experiments.config import load_config
from nanochat.config import Config
from nanochat.stages.finetune import lr_multiplier, muon_momentum

from tasks.identity import Identity
from tasks.mixtures import finetune_tasks
from tasks.spellingbee import SimpleSpelling, SpellingBee


def test_the_schedule_is_flat_then_linear_to_zero_over_the_last_half():
    n = 1000
    assert [lr_multiplier(s, n) for s in (0, 250, 500)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(750, n) == pytest.approx(0.5) and lr_multiplier(1000, n) == pytest.approx(0.0)
    assert lr_multiplier(900, n, final_lr_frac=0.1) == pytest.approx(0.2 + 0.8 * 0.1)
    assert lr_multiplier(50, n, warmup_ratio=0.1) == pytest.approx(0.5)


def test_muon_momentum_ramps_from_0_85_to_0_95_over_300_steps():
    assert muon_momentum(0) == pytest.approx(0.85) and muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(5000) == pytest.approx(0.95)


def mixture(fcfg, split="train"):
    cfg = Config()
    cfg.task_data = "fixture"  # the shipped files: the same tasks as the hub's, staged or not
    cfg.sft = fcfg
    tasks, weights = finetune_tasks(cfg, "sft", split)
    return [(type(t).__name__, getattr(t, "subset", None), w) for t, w in zip(tasks, weights)], tasks


def test_sft_trains_on_upstreams_head_mixture_and_starts_at_0_8_of_the_rates():
    cfg = Config()
    assert cfg.sft.init_lr_frac == 0.8 and (cfg.sft.warmdown_ratio, cfg.sft.final_lr_frac) == (0.5, 0.0)
    rows, _ = mixture(cfg.sft)
    assert [(name, w) for name, _, w in rows] == [("SmolTalk", 1.0), ("MMLU", 3.0), ("GSM8K", 4.0)]
    assert [(name, w) for name, _, w in mixture(cfg.sft, "val")[0]] == [("SmolTalk", 1.0), ("MMLU", 1.0),
                                                                           ("GSM8K", 1.0)]


def test_an_identity_file_alone_adds_its_conversations(tmp_path):
    own = tmp_path / "me.jsonl"
    own.write_text('[{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "me"}]\n')
    fcfg = Config().sft
    fcfg.identity = str(own)
    rows, tasks = mixture(fcfg)
    assert rows[-1][0] == "CustomJSON" and rows[-1][2] == 2.0 and len(tasks[-1]) == 1


def test_mid_train_and_the_embedded_preset_keep_identity_and_spelling_rows():
    _, tasks = mixture(Config().mid_train)
    assert {Identity, SimpleSpelling, SpellingBee} <= {type(t) for t in tasks}
    embedded = load_config([])
    assert (embedded.sft.mmlu_epochs, embedded.sft.gsm8k_epochs, embedded.sft.identity_epochs) == (1, 2, 2)
    assert embedded.sft.spelling_bee > 0 and embedded.sft.init_lr_frac == 0.8
