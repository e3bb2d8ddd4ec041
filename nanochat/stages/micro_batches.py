"""What the stages that read a loader (base_train, mid_train, sft) give TrainingSession.train as their
gradients: `MicroBatches`, and the test hook that records the batches each rank trains on (rl's too)."""

import json
import os
from pathlib import Path

import torch

from nanochat.stages.training import StepResult, TrainingSession


class MicroBatches:
    """One step's gradients from `accum` micro-batches of a ShardedLoader, the loss averaged over them; the next
    batch is always prepared while this one computes. `rank_state()` is the loader position before the batch in
    hand: what a checkpoint must record so a resume reads exactly the rows not yet trained on."""

    def __init__(self, session: TrainingSession, loader, accum: int, tokens_per_step: int, state=None):
        self.session, self.loader, self.accum, self.tokens = session, loader, accum, tokens_per_step
        self.forward = session.training_forward()
        self.consumed = state
        self.record = BatchRecord.from_env(session.world.rank)
        self._fetch()
        session.on_stop.append(loader.close)

    def _fetch(self) -> None:
        self.x, self.y, self.batch_state = next(self.loader)  # the loader thread prepared it meanwhile
        self.shard = self.loader.last_shard

    def __call__(self, step: int) -> StepResult:
        loss_sum = torch.zeros((), device=self.session.device)
        for _ in range(self.accum):
            if self.record:
                self.record.add(step, self.shard, self.x)
            loss = self.forward(self.x, self.y)
            loss_sum += loss.detach()
            self.session.backward(loss / self.accum)
            self.consumed = self.batch_state
            self._fetch()
        # the loss of the whole global batch, not of one micro-batch: comparable across world sizes
        return StepResult(loss_sum / self.accum, self.tokens)

    def rank_state(self) -> dict:
        return {"loader": self.consumed}


class BatchRecord:
    """NANOCHAT_TEST_RECORD_BATCHES=FOLDER: every rank appends the token ids of each micro-batch it trains on, with
    the step and the virtual shard they came from (rl: a prompt's rollouts, with its place among the step's
    prompts), to FOLDER/rank<r>.jsonl: how the tests check that a run resumed on another number of ranks trains on
    the rows an uninterrupted one does, in the same order."""

    ENV = "NANOCHAT_TEST_RECORD_BATCHES"

    def __init__(self, path):
        self.path = path

    @classmethod
    def from_env(cls, rank: int) -> "BatchRecord | None":
        folder = os.environ.get(cls.ENV)
        return cls(Path(folder) / f"rank{rank}.jsonl") if folder else None

    def add(self, step: int, shard: int, inputs: torch.Tensor) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "shard": shard, "rows": inputs.tolist()}) + "\n")
