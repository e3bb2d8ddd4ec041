"""What the evaluation stages (base_eval, chat_eval_sft, chat_eval_rl) share: the parts finished so far, kept
in progress.json, and a clean stop at a batch boundary. Asked to stop (USR2, a preemption), a stage stops at
the next boundary, keeps what it finished, requeues the job if that was the request, and the rerun skips the
finished parts."""

import json

from nanochat.common import atomic_write_json
from nanochat.distributed import agree
from nanochat.preemption import HANDLER, agreed_reason, count_restarts, stop, stop_record


class EvalProgress:
    def __init__(self, cfg, run, stage: str, rank: int):
        self.cfg, self.stage, self.rank = cfg, stage, rank
        self.path = run.stage_dir(stage) / "progress.json"
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        # the finished parts and the restart counters; "slurm": who saved them, for counting restarts (not a part)
        self.parts = count_restarts({k: v for k, v in saved.items() if k != "slurm"}, saved.get("slurm"), cfg, stage)

    def __contains__(self, part: str) -> bool:
        return part in self.parts

    def should_stop(self) -> bool:
        """Collective: did a signal reach any rank?"""
        return agree(HANDLER.requested)[0]

    def record(self, reason: str | None = None, **parts) -> None:
        self.parts.update(parts)
        if self.rank == 0:
            atomic_write_json(self.path, {**self.parts, "slurm": stop_record(reason)})

    def halt(self, where: str) -> None:
        """Stop the stage (raises Interrupted), after saving the finished parts and requeueing if asked."""
        reason = agreed_reason(self.rank, self.parts, self.cfg)
        self.record(reason)
        stop(f"{self.stage} stopped {where}; finished parts are kept", reason, self.rank)
