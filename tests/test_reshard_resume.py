"""End to end: base_train and sft stopped on 2 ranks (SIGTERM: they save and stop) and resumed on 1 and on 4
(data_shards=4) train on exactly the rows of an uninterrupted 2-rank run, global batch for global batch, and end
on its loss; 3 ranks, which do not divide the shards, are refused in one line."""

import json
import shutil
import signal
import subprocess
import time
from collections import defaultdict

import pytest

from test_base_train import base  # noqa: F401  (the shared tokenizer fixture)
from test_chat_stages import launch

BASE = ["stages=[base_train]", "save_every=-1", "num_iterations=10", "eval_every=-1", "core_metric_every=-1",
        "max_seq_len=128", "device_batch_size=2", "total_batch_size=1024", "data_shards=4"]  # 4 micro-batches a step
SFT = ["stages=[sft]", "save_every=-1", "sft.num_iterations=8", "sft.eval_every=-1", "sft.chat_eval_every=-1",
       "sft.max_seq_len=128", "sft.device_batch_size=2", "sft.total_batch_size=1024", "sft.data_shards=4"]
RECORD = "NANOCHAT_TEST_RECORD_BATCHES"
# measured on 2 CPU cores: base_train's final loss after a reshard equals the uninterrupted run's, sft's differs by
# 7.8e-8 relative (the same rows, summed in another order: the weights differ in the last bits)
LOSS_RTOL = 1e-5


def start(base, name, records, *overrides):
    records.mkdir(parents=True, exist_ok=True)
    cmd, env = launch(base, name, *overrides, **{RECORD: str(records)})
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def last_step(base, name, stage) -> int:
    path = base / "runs" / name / stage / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else -1


def stopped_after(base, name, stage, records, steps, *overrides):
    """Started on 2 ranks and sent SIGTERM once `steps` steps are logged: it saves a checkpoint and stops."""
    proc = start(base, name, records, *overrides, "nproc=2")
    deadline = time.time() + 300
    while proc.poll() is None and last_step(base, name, stage) < steps and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    assert result.returncode != 0 and "stopped at step" in result.stderr, result.stderr[-2000:]
    return last_step(base, name, stage)


def global_batches(*folders) -> dict[int, list]:
    """{step: rows} from the records of every rank: a step's rows ordered by virtual shard, each shard's in the
    order they were read; that order is the world size's business only, the rows and their order are not."""
    reads = defaultdict(list)
    for folder in folders:
        for path in sorted(folder.glob("rank*.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                reads[record["step"]].append(record)
    return {step: [row for r in sorted(records, key=lambda r: r["shard"]) for row in r["rows"]]
            for step, records in sorted(reads.items())}


def summary(base, name, stage) -> dict:
    return json.loads((base / "runs" / name / stage / "summary.json").read_text())


class Reshard:
    """One stage's uninterrupted 2-rank run, and one stopped on 2 ranks, as folders to resume copies of."""

    def __init__(self, base, stage, overrides, prefix):
        self.base, self.stage, self.overrides, self.prefix = base, stage, overrides, prefix
        self.records = base / f"records-{prefix}"
        straight = finish(start(base, f"{prefix}-straight", self.records / "straight", *overrides, "nproc=2"))
        assert straight.returncode == 0, straight.stderr[-3000:]
        self.stopped_at = stopped_after(base, f"{prefix}-stopped", stage, self.records / "stopped", 3, *overrides)
        assert 3 <= self.stopped_at < 8, self.stopped_at

    def resume(self, world_size: int) -> subprocess.CompletedProcess:
        name = f"{self.prefix}-on{world_size}"
        shutil.copytree(self.base / "runs" / f"{self.prefix}-stopped", self.base / "runs" / name)
        return finish(start(self.base, name, self.records / name, *self.overrides, f"nproc={world_size}"))

    def check(self, world_size: int) -> None:
        result = self.resume(world_size)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"resharded from 2 to {world_size} ranks" in result.stdout
        straight = global_batches(self.records / "straight")
        resumed = global_batches(self.records / "stopped", self.records / f"{self.prefix}-on{world_size}")
        assert list(resumed) == list(straight)  # every step trained once, none twice
        for step in straight:
            assert resumed[step] == straight[step], f"step {step}: other rows"
        ours = summary(self.base, f"{self.prefix}-on{world_size}", self.stage)
        theirs = summary(self.base, f"{self.prefix}-straight", self.stage)
        assert ours["world_size"] == world_size and ours["step"] == theirs["step"]
        assert ours["world_sizes"] == [[0, 2], [self.stopped_at, world_size]]  # what experiments.status shows
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)
        print(f"{self.stage} on {world_size} ranks: final loss {ours['loss']!r} vs {theirs['loss']!r} "
              f"(relative {abs(ours['loss'] / theirs['loss'] - 1):.1e}), same weights: "
              f"{ours['weights_sha256'] == theirs['weights_sha256']}")


@pytest.fixture(scope="module")
def pretraining(base):  # noqa: F811
    return Reshard(base, "base_train", BASE, "base")


@pytest.fixture(scope="module")
def finetuning(base):  # noqa: F811
    model = launch(base, "sft-input", "stages=[base_train]", "num_iterations=4", "eval_every=-1",
                   "core_metric_every=-1", "max_seq_len=128", "device_batch_size=2", "total_batch_size=1024")
    assert subprocess.run(model[0], env=model[1], capture_output=True).returncode == 0
    return Reshard(base, "sft", [*SFT, f"base_checkpoint={base / 'runs' / 'sft-input' / 'base_train'}"], "sft")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 4])
def test_base_train_resumed_on_other_world_sizes_trains_on_the_same_rows(pretraining, world_size):
    pretraining.check(world_size)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 4])
def test_sft_resumed_on_other_world_sizes_trains_on_the_same_rows(finetuning, world_size):
    finetuning.check(world_size)


@pytest.mark.slow
def test_a_world_size_that_does_not_divide_the_shards_is_one_line(pretraining):
    result = pretraining.resume(3)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (f"error: base_train's checkpoint step_{pretraining.stopped_at:06d} was written by 2 ranks and resumes "
            f"on 1, 2 or 4 ranks (they divide data_shards=4), not on 3") in result.stderr
