import json
import pickle
import random
import re
from dataclasses import asdict

import pytest
import torch

from nanochat.checkpoint import CheckpointManager, rng_state, set_rng_state, weights_sha256
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.model_io import export_upstream, load_model

CONFIG = GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")


def save(manager, step, value=0.0):
    model = {"w": torch.full((3, 3), float(step)), "b": torch.tensor([value])}
    manager.save(step, model, {"m": torch.ones(2) * step}, {"loader": {"next_k": step}, "rng": rng_state()},
                 {"counters": {"step": step}, "model_config": {}})
    return model


def test_save_load_keeps_the_newest_complete(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4, 6):
        save(manager, step)
    assert [p.name for p in manager.complete()] == ["step_000004", "step_000006"]  # pruned to keep=2
    assert (tmp_path / "latest").read_text().strip() == "step_000006"
    loaded = manager.load()
    assert loaded["step"] == 6 and torch.equal(loaded["model"]["w"], torch.full((3, 3), 6.0))
    assert torch.equal(loaded["optim"][0]["m"], torch.ones(2) * 6) and loaded["rank_state"]["loader"]["next_k"] == 6


def test_torn_checkpoints_are_skipped_with_a_warning(tmp_path, capsys):
    manager = CheckpointManager(tmp_path)
    save(manager, 2)
    (tmp_path / ".step_000004.tmp").mkdir()  # killed mid-write
    (tmp_path / ".step_000004.tmp" / "model.pt").write_bytes(b"half a file")
    (tmp_path / "step_000006").mkdir()  # a folder without its marker (e.g. a partial copy)
    assert manager.load()["step"] == 2
    assert "skipping incomplete checkpoint(s) .step_000004.tmp, step_000006" in capsys.readouterr().out
    save(manager, 8)
    assert not list(tmp_path.glob(".step_*.tmp"))  # the next save cleans torn writes


def test_an_older_checkpoint_on_another_world_size_is_one_clear_line(tmp_path):
    save(CheckpointManager(tmp_path, world_size=1), 2)  # its meta.json lists no world sizes: an earlier version's
    with pytest.raises(UserError, match="written by 1 ranks with an earlier version, whose optimizer state loads "
                                        "on 1 ranks only: resume with 1 ranks once"):
        CheckpointManager(tmp_path, rank=0, world_size=2).load()


@pytest.mark.parametrize("divided", ["data_shards=4", "rl.examples_per_step=4"])  # a loader's stage, rl
def test_a_world_size_the_checkpoint_does_not_resume_on_names_those_it_does(tmp_path, divided):
    key = divided.removeprefix("rl.").split("=")[0]
    CheckpointManager(tmp_path, world_size=1).save(2, {"w": torch.zeros(1)}, {}, {"rng": rng_state()},
                                                   {"counters": {}, key: 4, "world_sizes": [1, 2, 4]})
    with pytest.raises(UserError, match=rf"written by 1 ranks and resumes on 1, 2 or 4 ranks \(they divide "
                                        rf"{re.escape(divided)}\), not on 3"):
        CheckpointManager(tmp_path, rank=0, world_size=3).load()


def test_async_save_is_complete_only_after_the_writer(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_CKPT_PAUSE_S", "0.5")
    manager = CheckpointManager(tmp_path, async_save=True)
    model = save(manager, 2)
    model["w"].fill_(-1.0)  # training goes on and changes the weights: the snapshot must not see it
    assert manager.complete() == []  # the writer is still busy
    manager.poll()
    assert manager.complete() == []
    manager.wait()
    assert [p.name for p in manager.complete()] == ["step_000002"]
    assert torch.equal(manager.load()["model"]["w"], torch.full((3, 3), 2.0))


def test_async_save_records_the_counters_of_its_own_step(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_CKPT_PAUSE_S", "0.3")
    manager = CheckpointManager(tmp_path, async_save=True)
    counters = {"step": 2}
    manager.save(2, {"w": torch.zeros(2)}, {}, {"rng": rng_state()}, {"counters": counters})
    counters["step"] = 3  # the session counts on while the writer works
    manager.wait()
    assert manager.load()["meta"]["counters"] == {"step": 2}


def test_finish_keeps_only_final_weights(tmp_path):
    manager = CheckpointManager(tmp_path)
    for step in (2, 4):
        save(manager, step)
    manager.finish()
    assert [p.name for p in manager.complete()] == ["step_000004"]
    assert not list(tmp_path.glob("*/optim_rank*.pt"))
    assert manager.load()["optim"] is None  # a finished stage cannot be trained further from it


def test_rng_state_roundtrip():
    state = rng_state()
    first = (torch.rand(3), random.random())
    set_rng_state(pickle.loads(pickle.dumps(state)))
    assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1]


def test_weights_sha256_is_dtype_and_order_independent():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, 2)}
    b = {"y": torch.ones(2, 2, dtype=torch.float64), "x": torch.arange(4.0)}
    assert weights_sha256(a) == weights_sha256(b)
    assert weights_sha256(a) != weights_sha256({**a, "x": torch.arange(4.0) + 1e-3})


def our_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT.build(CONFIG)
    manager = CheckpointManager(tmp_path / "base_train" / "checkpoints")
    manager.save(5, model.state_dict(), {}, {}, {"model_config": asdict(CONFIG)})
    return model


def test_load_model_from_a_stage_folder_and_its_upstream_export(tmp_path):
    model = our_checkpoint(tmp_path)
    idx = torch.randint(0, 100, (1, 16))
    loaded, meta = load_model(tmp_path / "base_train")
    assert meta["step"] == 5 and torch.equal(loaded(idx), model(idx))
    exported = export_upstream(tmp_path / "base_train", tmp_path / "upstream")
    assert exported.name == "model_000005.pt"
    assert all(v.dtype == torch.float32 for v in torch.load(exported).values())  # the masters, as upstream keeps
    again, meta = load_model(tmp_path / "upstream")
    assert torch.equal(again(idx), model(idx))
    half = export_upstream(tmp_path / "base_train", tmp_path / "upstream-bf16", torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in torch.load(half).values())
    again, meta = load_model(tmp_path / "upstream-bf16")
    assert torch.allclose(again(idx), model(idx), atol=0.1)  # bf16 weights: close, not equal


def test_an_older_upstream_checkpoint_without_the_residual_scalars_loads_as_it_ran(tmp_path, capsys):
    torch.manual_seed(2)
    model = GPT.build(CONFIG)
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.fill_(0.0)
    old = {k: v for k, v in model.state_dict().items() if k not in ("resid_lambdas", "x0_lambdas")}
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save(old, folder / "model_000010.pt")
    (folder / "meta_000010.json").write_text(json.dumps({"step": 10, "model_config": asdict(CONFIG)}))
    loaded, _ = load_model(folder)
    idx = torch.randint(0, 100, (1, 16))
    assert torch.equal(loaded(idx), model(idx))
    assert "no resid_lambdas (an older upstream checkpoint)" in capsys.readouterr().err


def test_load_upstream_checkpoint_from_a_compiled_model(tmp_path):
    """Upstream saves model_NNNNNN.pt (keys may carry torch.compile's _orig_mod.) + meta_NNNNNN.json."""
    torch.manual_seed(1)
    model = GPT.build(CONFIG)
    folder = tmp_path / "d2"
    folder.mkdir()
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, folder / "model_000700.pt")
    torch.save({}, folder / "model_000300.pt")  # an older step: not the one taken
    config = {"sequence_len": 32, "vocab_size": 100, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 64,
              "window_pattern": "SL"}
    (folder / "meta_000700.json").write_text(json.dumps({"step": 700, "model_config": config}))
    loaded, meta = load_model(folder)
    idx = torch.randint(0, 100, (2, 8))
    assert meta["step"] == 700 and torch.equal(loaded(idx), model(idx))


def test_nothing_to_load_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_model(tmp_path)


def test_load_model_checks_an_upstream_checkpoint_in_one_line(tmp_path):
    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    state = GPT.build(config).state_dict()
    state["lm_head.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "model_000001.pt")
    (tmp_path / "meta_000001.json").write_text(json.dumps({"model_config": asdict(config)}))
    with pytest.raises(UserError, match=r"wrong shape or kind: lm_head.weight: \(3, 3\)") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_load_model_verifies_our_checkpoint(tmp_path):
    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    CheckpointManager(tmp_path).save(1, GPT.build(config).state_dict(), {}, {"rng": rng_state()},
                                     {"model_config": asdict(config)})
    weights = tmp_path / "step_000001" / "model.pt"
    assert load_model(tmp_path)[1]["step"] == 1
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum differs"):
        load_model(tmp_path)


def test_a_non_finite_state_is_never_saved(tmp_path):
    manager = CheckpointManager(tmp_path)
    save(manager, 2)
    with pytest.raises(UserError, match=r"step 4: rank 0's weights or optimizer state are not finite .* the last "
                                        r"good checkpoint is .*step_000002") as err:
        manager.save(4, {"w": torch.tensor([float("nan")])}, {}, {"rng": rng_state()}, {})
    assert "\n" not in str(err.value)
    assert [p.name for p in manager.complete()] == ["step_000002"] and not list(tmp_path.glob(".step_*"))


@pytest.mark.parametrize("async_save", [False, True])
def test_a_writer_that_fails_in_any_way_never_leaves_a_complete_checkpoint(tmp_path, monkeypatch, async_save):
    import nanochat.checkpoint as checkpoint
    from nanochat.storage import StorageFailure

    manager = CheckpointManager(tmp_path, async_save=async_save)
    save(manager, 2)
    manager.wait()
    real = checkpoint.save_with_digest

    def failing(obj, path):
        if path.name == "state_rank0.pt":
            raise RuntimeError("not picklable")
        return real(obj, path)

    monkeypatch.setattr(checkpoint, "save_with_digest", failing)
    with pytest.raises(StorageFailure, match="checkpoint step 4 .rank 0. failed: RuntimeError: not picklable"):
        save(manager, 4)
        manager.wait()
    assert [p.name for p in manager.complete()] == ["step_000002"] and not list(tmp_path.glob(".step_*"))


DAMAGES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "emptied": lambda p: p.write_bytes(b""),
    "bit-flipped": lambda p: p.write_bytes(p.read_bytes()[:-40] + bytes(b ^ 0x5A for b in p.read_bytes()[-40:])),
    "garbage": lambda p: p.write_bytes(random.Random(0).randbytes(max(64, p.stat().st_size))),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("victim", ["model.pt", "optim_rank0.pt", "state_rank0.pt", "manifest_rank0.json",
                                    "meta.json"])
def test_every_kind_of_damage_to_every_file_falls_back_to_the_older_checkpoint(tmp_path, capsys, victim, damage):
    """The full matrix, in process (tests/test_storage_faults.py resumes real runs from a subset of it)."""
    manager = CheckpointManager(tmp_path)
    for step in (2, 4):
        save(manager, step)
    DAMAGES[damage](tmp_path / "step_000004" / victim)
    loaded = manager.load()
    assert loaded["step"] == 2 and torch.equal(loaded["model"]["w"], torch.full((3, 3), 2.0))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and victim in warnings[0] and "step_000004.corrupt" in warnings[0], warnings
    assert (tmp_path / "step_000004.corrupt").is_dir() and [p.name for p in manager.complete()] == ["step_000002"]
