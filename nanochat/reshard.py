"""Resuming a stage on another number of ranks: which world sizes a checkpoint can resume on, said in one line
when this job's is not one of them. Torch-free: the launcher checks before it starts any rank.

A training stage records in each checkpoint's meta.json the world sizes whose steps compute what its own did
(`world_sizes`): for the stages that read a loader, the divisors of `data_shards` (each rank then reads whole
virtual shards, and a step reads the same rows whatever the world size); for rl, the divisors of its prompts per
step. A checkpoint without the list was written before optimizer state was kept per parameter: it resumes on
the world size that wrote it only.
"""

from nanochat.common import UserError


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_world_size(meta: dict, world_size: int, where: str) -> None:
    """Raise a UserError unless the checkpoint whose meta.json is `meta` (at `where`) resumes on `world_size`."""
    written_by = meta["world_size"]
    if world_size == written_by:
        return
    sizes = meta.get("world_sizes")
    if sizes is None:
        raise UserError(f"{where} was written by {written_by} ranks with an earlier version, whose optimizer state "
                        f"loads on {written_by} ranks only: resume with {written_by} ranks once (its next checkpoint "
                        f"resumes on other world sizes), or start a new run (run_name=...)")
    if world_size not in sizes:
        divided = (f"data_shards={meta['data_shards']}" if meta.get("data_shards") else
                   f"rl.examples_per_step={meta['examples_per_step']}" if meta.get("examples_per_step") else None)
        why = f" (they divide {divided})" if divided else ""
        raise UserError(f"{where} was written by {written_by} ranks and resumes on {_either(sizes)} ranks{why}, "
                        f"not on {world_size}")


def _either(sizes: list[int]) -> str:
    words = [str(s) for s in sizes]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
