"""sft's defaults are upstream's chat_sft at HEAD: the learning-rate schedule, Muon's momentum ramp, the initial
learning-rate fraction, the optimizer's warm start from the base checkpoint and the mixture; mid_train and the
embedded preset keep mixtures of their own."""

from types import SimpleNamespace

import pytest
import torch

from experiments.config import load_config
from nanochat.checkpoint import CheckpointManager, rng_state
from nanochat.config import Config, learning_rates
from nanochat.gpt import GPT, model_config_for_depth
from nanochat.optim import build_optimizer
from nanochat.optim_state import pieces
from nanochat.stages.finetune import lr_multiplier, muon_momentum
from nanochat.stages.training import fine_tuning_optimizer, warm_start

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


def _session(model, optimizer, world_size: int = 1):
    """What warm_start uses of a TrainingSession."""
    return SimpleNamespace(world=SimpleNamespace(rank=0, world_size=world_size), optimizer=optimizer,
                           param_names={p: name for name, p in model.named_parameters()})


def _trained_base(folder, steps: int = 2, older_format: bool = False):
    """A d2 model and its optimizer after a few steps, saved as base_train leaves its final checkpoint (or as an
    earlier version did: torch's state_dict of the rank's shard)."""
    torch.manual_seed(0)
    model = GPT.build(model_config_for_depth(2, 256, 32))
    # weight decay as pretraining ends with some: sft's own (0) must survive the warm start
    optimizer = build_optimizer(model.param_groups(), d_model=model.config.n_embd, **learning_rates(),
                                weight_decay=0.2)
    for _ in range(steps):
        model(torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    manager = CheckpointManager(folder)
    names = _session(model, optimizer).param_names
    state = optimizer.state_dict() if older_format else pieces(optimizer, names)
    manager.save(steps, model.state_dict(), state, {"rng": rng_state()}, {})
    manager.finish(keep_optimizer=True)
    return model, optimizer, manager.complete()[-1]


@pytest.mark.parametrize("world_size, older_format", [(1, False), (2, False), (1, True)],
                         ids=["same world size", "another world size", "older format"])
def test_sft_warm_starts_the_optimizer_from_the_base_checkpoint_with_its_own_learning_rates(tmp_path, capsys,
                                                                                           world_size, older_format):
    base_model, base_optimizer, step_dir = _trained_base(tmp_path, older_format=older_format)
    cfg = Config()
    optimizer = fine_tuning_optimizer(base_model, cfg, cfg.sft.init_lr_frac, cfg.sft.weight_decay)
    fresh = [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert warm_start(_session(base_model, optimizer, world_size), step_dir)
    assert "optimizer warm-started" in capsys.readouterr().out
    assert [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups] == fresh
    saved, loaded = base_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) > 0
    for key in saved:
        for name, value in saved[key].items():
            assert torch.equal(value, loaded[key][name]) if torch.is_tensor(value) else value == loaded[key][name]


@pytest.mark.parametrize("damage, why", [
    ("older format, other world size", "written by 1 ranks with an earlier version and this job has 2"),
    ("optimizer pruned", "keeps no optimizer state"),
    ("bit-flipped", "optim_rank0.pt: "),
])
def test_sft_starts_fresh_and_says_why_when_the_base_optimizer_cannot_be_used(tmp_path, capsys, damage, why):
    model, _, step_dir = _trained_base(tmp_path, older_format=damage.startswith("older"))
    if damage == "optimizer pruned":
        CheckpointManager(tmp_path).finish()
    if damage == "bit-flipped":
        shard = step_dir / "optim_rank0.pt"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    optimizer = fine_tuning_optimizer(model, Config(), 0.8, 0.0)
    assert not warm_start(_session(model, optimizer, 2 if damage.startswith("older") else 1), step_dir)
    line = capsys.readouterr().out
    assert line.startswith("fresh optimizer: no warm start") and why in line, line
    assert optimizer.state_dict()["state"] == {}
