"""End to end: the launcher trains a tiny model on the embedded corpus, on 1 and 2 CPU processes, and on
upstream's golden fixture as upstream's own base_train does."""

import json
from pathlib import Path

import pytest

from test_launch import launch

UPSTREAM_FIXTURE = Path(__file__).parent / "fixtures" / "upstream"  # made by make_golden.py there
TINY = ["depth=2", "num_iterations=8", "eval_every=4", "eval_tokens=8192", "sample_every=8"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    result = launch("stages=[tok_train]", "run_name=shared", env_base=base)
    assert result.returncode == 0, result.stderr
    return base


def train(base, name, *extra):
    tokenizer = base / "runs" / "shared" / "tok_train" / "tokenizer"
    result = launch("stages=[base_train]", f"run_name={name}", f"tokenizer={tokenizer}", *TINY, *extra, env_base=base)
    assert result.returncode == 0, result.stderr
    run = base / "runs" / name / "base_train"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "summary.json").read_text()), rows, result.stdout


@pytest.mark.slow
def test_trains_deterministically_and_reports(base):
    summary, rows, stdout = train(base, "a")
    assert summary["step"] == 8 and summary["tokens"] == 8 * summary["total_batch_size"] and summary["depth"] == 2
    assert len(summary["weights_sha256"]) == 64 and summary["val_bpb"] < 3.5 and summary["world_size"] == 1
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    for key in ("step", "loss", "lrm", "dt", "tok_per_sec", "mfu", "tokens", "flops", "time"):
        assert key in train_rows[-1]
    assert [r["step"] for r in rows if "val_bpb" in r] == [0, 4, 8]
    assert "total_batch_size" in stdout and "sample:" in stdout  # the plan and samples are logged
    again, _, _ = train(base, "b")
    assert again["weights_sha256"] == summary["weights_sha256"]  # same seed, same data: same weights on CPU


@pytest.mark.slow
def test_compiled_steps_follow_the_eager_loss_curve(base):
    """compile=true on the CPU (inductor's C++ kernels): the same losses as eager up to rounding, and the summary
    says which setting its weights_sha256 belongs to."""
    summary, rows, stdout = train(base, "compiled", "compile=true", "eval_every=-1", "sample_every=-1")
    eager, eager_rows, eager_out = train(base, "eager", "eval_every=-1", "sample_every=-1")
    assert "base_train: torch.compile on (compile=true)" in stdout and summary["compiled"] is True
    assert "base_train: torch.compile off (cpu: " in eager_out and eager["compiled"] is False  # a CPU: eager
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and losses == pytest.approx([r["loss"] for r in eager_rows if "loss" in r], rel=1e-4)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(base):
    """2 ranks (gloo) against 1 process reading the same 2 data shards with 2 accumulation steps: the same global
    batches, so the same losses up to float summation order. The 2 ranks log every 3rd step (as on a GPU, where
    the host then waits for the device only every 3rd step), with an evaluation inside a window and the last save
    between two logged steps: each row is the mean loss of its steps."""
    summary, rows, _ = train(base, "ddp", "nproc=2", "device_batch_size=4", "log_every=3")
    assert summary["world_size"] == 2 and summary["step"] == 8 and summary["tokens"] == 8 * summary["total_batch_size"]
    _, single_rows, _ = train(base, "single", "data_shards=2", "device_batch_size=4")
    single = [r["loss"] for r in single_rows if "loss" in r]
    assert len(single) == 8
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6, 8] and [r["tokens"] for r in logged] == [
        step * summary["total_batch_size"] for step in (3, 6, 8)]
    windows = [single[0:3], single[3:6], single[6:8]]
    assert [r["loss"] for r in logged] == pytest.approx([sum(w) / len(w) for w in windows], rel=1e-6)
    evaluations = [r for r in rows if "val_bpb" in r]  # the one at step 4 inside a window counts its steps too
    assert [(r["step"], r["tokens"]) for r in evaluations] == [(s, s * summary["total_batch_size"]) for s in (0, 4, 8)]
    assert summary["loss"] == pytest.approx(single[-1], rel=1e-6)  # the last step's, not its window's mean


@pytest.mark.slow
def test_core_while_pretraining_every_core_metric_every_steps(base):
    from test_core_eval import write_bundle

    write_bundle(base / "eval_bundle")  # the handmade bundle, staged where the run looks for it
    summary, rows, _ = train(base, "core", "core_metric_every=4", "core_metric_max_per_task=2", "eval_every=-1")
    core = [r for r in rows if "core_metric" in r]
    assert [r["step"] for r in core] == [4, 8] and summary["core_metric"] == core[-1]["core_metric"]  # as upstream


def golden_record() -> tuple[dict, dict]:
    """Upstream's golden training: (its settings, its losses and weights_sha256 on this kind of CPU). Kernels
    round differently from one instruction set to another (AVX2, AVX512), so the record must come from the same
    kind; a kind without one skips, naming the command that makes it."""
    import torch

    golden = json.loads((UPSTREAM_FIXTURE / "golden_training.json").read_text())
    cpu = torch.backends.cpu.get_cpu_capability()
    if cpu not in golden["by_cpu"]:
        pytest.skip(f"no golden record for {cpu} CPUs: make one with tests/fixtures/upstream/make_golden.py")
    return golden["settings"], golden["by_cpu"][cpu]


def golden_run(tmp_path, fused_loss: bool):
    """Our base_train on the golden fixture with its settings: (upstream's golden record on this kind of CPU, our
    losses, our weights_sha256)."""
    from experiments.upstream import our_overrides

    settings, golden = golden_record()
    data = tmp_path / "base_data_climbmix"  # the fixture as climbmix: its validation shard is the pinned last one
    data.mkdir()
    *train, val = sorted(UPSTREAM_FIXTURE.glob("shard_*.parquet"))
    for shard in train:
        (data / shard.name).symlink_to(shard)
    (data / "shard_06542.parquet").symlink_to(val)
    result = launch("stages=[base_train]", "run_name=golden", "dataset=climbmix",
                    f"tokenizer={UPSTREAM_FIXTURE}/tokenizer", *our_overrides(settings, fused_loss),
                    "compile=false",
                    env_base=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "golden" / "base_train"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    return golden, [row["loss"] for row in rows if "loss" in row], summary["weights_sha256"]


@pytest.mark.slow
def test_same_losses_and_weights_as_upstream(tmp_path):
    """Upstream's own scripts/base_train.py made golden_training.json (d2, fp32 on CPU, 20 steps on the fixture's
    shards and tokenizer); ours, with upstream's plain loss (fused_loss=false), makes the same loss at every step
    and the same final weights, bit for bit, on the same kind of CPU. (On the torch it was made with: another
    version's CPU kernels may round differently; then run make_golden.py.)"""
    golden, losses, weights = golden_run(tmp_path, fused_loss=False)
    assert losses == golden["losses"]
    assert weights == golden["weights_sha256"]


@pytest.mark.slow
def test_fused_loss_follows_upstream_closely(tmp_path):
    """Our default loss (row chunks, other summation orders) follows upstream's over the 20 steps within a few fp32
    ulps: at most 9.5e-7 measured (one ulp at these losses, ~9); the weights are no longer bit-equal."""
    golden, losses, _ = golden_run(tmp_path, fused_loss=True)
    assert losses == pytest.approx(golden["losses"], abs=4e-6, rel=0)


@pytest.mark.slow
def test_compiled_cpu_steps_give_the_same_weights_every_time(cpu_compile_settings_restored):
    """Two models from the same seed, each compiled for training on the CPU, trained side by side: equal weights
    after every step. Without deterministic algorithms inductor's scatter kernels add with atomics across threads,
    and the weights differed after the second step."""
    import torch

    from experiments.train_timing import build_for_training, random_batch
    from nanochat.stages.training import compiled_for_training

    device, runs = torch.device("cpu"), []
    for _ in range(2):
        torch.manual_seed(0)
        model, optimizer = build_for_training(2, 1024, 128, device)
        runs.append((model, optimizer, compiled_for_training(model, optimizer, device)))
    batch = random_batch(1024, 4, 128, device)
    for step in range(3):
        for model, optimizer, step_model in runs:
            step_model(*batch).backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
        first, second = runs[0][0].state_dict(), runs[1][0].state_dict()
        assert [name for name in first if not torch.equal(first[name], second[name])] == [], f"after step {step}"
