"""End to end: base_train and sft stopped on 2 ranks (SIGTERM: they save and stop) and resumed on 1 and on 4
(data_shards=4) train on exactly the rows of an uninterrupted 2-rank run, global batch for global batch, and end
on its loss; 3 ranks, which do not divide the shards, are refused in one line.

The same for rl (4 prompts a step, so 1, 2 or 4 ranks): each step's prompts and every completion sampled for them,
in the step's order, equal the uninterrupted run's, as do its final reward and pass@k. A rollout's seed is a
function of (step, prompt), not of a rank's generator, and a prompt's completions are generated in batches of
rl.device_batch_size whatever the world size, so a step samples the same tokens as long as the weights are the
same. After a reshard they are the same up to the gradients' summation order, and a token could then flip where a
draw falls within that difference of a boundary of the sampling distribution; from there on the rollouts would
differ. The tiny model here earns no reward (advantages 0: its weights do not move), so this test checks the
prompts and seeds, not that. Measured once on the embedded default's SFT model (2 cores, fp32, 8 steps of 4
prompts x 4 samples x 64 tokens at temperature 0.7, rewards 0.62-1.0, the weights moved 5% by RL): stopped on 2
ranks after step 4 and resumed on 1 and on 4, every rollout of steps 5-8 equal, rewards and pass@1 equal, the
final weights 1.0e-7 apart (relative, largest over tensors)."""

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
RL = ["stages=[rl]", "save_every=-1", "rl.num_iterations=8", "rl.examples_per_step=4", "rl.num_samples=2",
      "rl.device_batch_size=2", "rl.max_new_tokens=12", "rl.eval_every=8", "rl.eval_examples=4",
      "rl.task=arithmetic"]
RECORD = "NANOCHAT_TEST_RECORD_BATCHES"
# measured on 2 CPU cores, fp32: base_train's final loss after a reshard is within 1.1e-7 relative of the
# uninterrupted run's (on 4 ranks equal), sft's equal or 7.8e-8 apart (the same rows, summed in another order: the
# weights differ in the last bits); rl's is minus its reward, 0 for the tiny model (see above)
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

    def __init__(self, base, stage, overrides, prefix, figures=("loss",)):
        self.base, self.stage, self.overrides, self.prefix, self.figures = base, stage, overrides, prefix, figures
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
        for figure in self.figures:
            assert ours[figure] == pytest.approx(theirs[figure], rel=LOSS_RTOL), figure
        difference = abs(ours["loss"] - theirs["loss"]) / (abs(theirs["loss"]) or 1.0)  # rl's here is 0
        print(f"{self.stage} on {world_size} ranks: final loss {ours['loss']!r} vs {theirs['loss']!r} "
              f"(relative {difference:.1e}), same weights: "
              f"{ours['weights_sha256'] == theirs['weights_sha256']}")


@pytest.fixture(scope="module")
def pretraining(base):  # noqa: F811
    return Reshard(base, "base_train", BASE, "base")


@pytest.fixture(scope="module")
def tiny_model(base):  # noqa: F811
    """A 4-step base model: what sft and rl start from."""
    model = launch(base, "sft-input", "stages=[base_train]", "num_iterations=4", "eval_every=-1",
                   "core_metric_every=-1", "max_seq_len=128", "device_batch_size=2", "total_batch_size=1024")
    assert subprocess.run(model[0], env=model[1], capture_output=True).returncode == 0
    return base / "runs" / "sft-input" / "base_train"


@pytest.fixture(scope="module")
def finetuning(base, tiny_model):  # noqa: F811
    return Reshard(base, "sft", [*SFT, f"base_checkpoint={tiny_model}"], "sft")


@pytest.fixture(scope="module")
def reinforcement(base, tiny_model):  # noqa: F811
    return Reshard(base, "rl", [*RL, f"sft_checkpoint={tiny_model}"], "rl",
                   figures=("loss", "reward", "pass@1", "pass@2"))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 4])
def test_base_train_resumed_on_other_world_sizes_trains_on_the_same_rows(pretraining, world_size):
    pretraining.check(world_size)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 4])
def test_sft_resumed_on_other_world_sizes_trains_on_the_same_rows(finetuning, world_size):
    finetuning.check(world_size)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 4])
def test_rl_resumed_on_other_world_sizes_samples_the_same_rollouts(reinforcement, world_size):
    reinforcement.check(world_size)


@pytest.mark.slow
@pytest.mark.parametrize("stopped, divided", [("pretraining", "data_shards=4"),
                                              ("reinforcement", "rl.examples_per_step=4")])
def test_a_world_size_that_does_not_divide_the_step_is_one_line(request, stopped, divided):
    run = request.getfixturevalue(stopped)
    result = run.resume(3)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (f"error: {run.stage}'s checkpoint step_{run.stopped_at:06d} was written by 2 ranks and resumes "
            f"on 1, 2 or 4 ranks (they divide {divided}), not on 3") in result.stderr
