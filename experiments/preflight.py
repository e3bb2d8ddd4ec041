"""What a run's stages will read and write, checked before any starts: on the login node at submission (a GPU
job that fails after its queue wait on a missing file costs the wait) and before a local run. One line each,
with the command that stages what is missing; each fact is checked by the module that owns it.

    data shards        enough training shards for the planned tokens, and the validation shard (nanochat.dataset)
    tokenizer          this run's, unless tok_train makes it first (nanochat.stages)
    CORE eval bundle   when base_eval asks for CORE (nanochat.assets)
    chat tasks         for the chat stages (tasks.mixtures)
    runs_root          writable, with room for one checkpoint of the planned model (nanochat.storage)
    world size         a stage in progress resumes on the job's number of ranks (nanochat.reshard)

Torch-free: the plan (parameters, tokens) is nanochat.depth's, in closed form.
"""

import json
import os
from pathlib import Path

from nanochat import assets, registry
from nanochat.common import UserError
from nanochat.dataset import check_shards, shards_for
from nanochat.depth import model_config, plan
from nanochat.model_config import param_counts
from nanochat.reshard import check_world_size
from nanochat.runs import Run
from nanochat.stage_table import BY_NAME
from nanochat.storage import free_bytes, gib, space_report
from nanochat.world import discover_world

from tasks.mixtures import check_staged

# measured: a d4 checkpoint is 120.1 MiB for 11.5M parameters (fp32 weights, Muon and AdamW state, loader and RNG
# state; BENCHMARKS.md), the same bytes per parameter at any depth
CHECKPOINT_BYTES_PER_PARAM = 11
PRETRAINING_DATA_STAGES = ("tok_train", "tok_eval", "base_train", "base_eval")


def check_inputs(cfg, run: Run, todo: list[str]) -> list[str]:
    """Raise a UserError for the first thing the stages in `todo` would miss; return notes on what they would
    do without (base_eval's CORE, under base_eval.core=auto, reads n/a without the bundle)."""
    # every other stage reads the tokenizer; one given as tokenizer=PATH may be a sweep's, which its own job trains
    if todo and "tok_train" not in todo and not cfg.tokenizer:
        from nanochat.stages import tokenizer_dir

        tokenizer_dir(cfg, run)
    check_resume_world_size(cfg, run, todo)  # before the plan: a batch that does not divide is the consequence
    if any(s in PRETRAINING_DATA_STAGES for s in todo):
        tokens = base_train_plan(cfg, run).total_tokens if "base_train" in todo else 0
        check_shards(cfg.dataset, shards_for(cfg.dataset, tokens))
    notes = []
    if "base_eval" in todo and cfg.base_eval.core != "off":
        try:
            assets.staged_archive(registry.EVAL_BUNDLE)
        except UserError as missing:
            if cfg.base_eval.core == "required":
                raise
            notes.append(f"note: base_eval's CORE will read n/a: {missing}")
    check_staged(cfg, todo)
    if todo:
        folder = writable_ancestor(run)
        if any(BY_NAME[s].makes for s in todo):  # a stage that saves checkpoints of the model
            params = param_counts(model_config(cfg, vocab_size(cfg, run)))["total"]
            check_room(folder, CHECKPOINT_BYTES_PER_PARAM * params)
    return notes


def check_this_machine(cfg) -> None:
    """A local run (no +cluster): the device it names exists, and its local ranks fit the machine, one GPU each
    on a GPU, at most two per core on the CPU (CPU ranks exist to test DDP; more only contend for the cores)."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda, but torch sees no CUDA GPU on this machine: leave device= empty (autodetect) "
                        "or set device=cpu, or submit to a GPU partition with +cluster=NAME")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps, but this machine has no Apple GPU: leave device= empty or set device=cpu")
    if discover_world().world_size > 1:  # a rank of a job (srun, or spawned here): the launcher checked nproc
        return
    gpu = cfg.device == "cuda" or (not cfg.device and torch.cuda.is_available())
    limit = torch.cuda.device_count() if gpu else 2 * (os.cpu_count() or 1)
    if cfg.nproc > limit:
        what = f"{limit} GPU(s)" if gpu else f"{os.cpu_count()} CPU core(s), so at most {limit} CPU ranks"
        raise UserError(f"nproc={cfg.nproc}, but this machine has {what}: set nproc={limit} or fewer")


def world_size(cfg) -> int:
    """The number of ranks the job will have: the cluster profile's, else nproc local ones, else this job's."""
    cluster = cfg.cluster
    return cluster.nodes * cluster.ranks_per_node if cluster else max(cfg.nproc, discover_world().world_size)


def base_train_plan(cfg, run: Run):
    """base_train's plan (a batch that does not divide over the ranks fails here too): at the world size the job
    will have, with the tokenizer's vocabulary (the one tok_train will train, while there is none yet)."""
    return plan(cfg, vocab_size(cfg, run), world_size(cfg))


def check_resume_world_size(cfg, run: Run, todo: list[str]) -> None:
    """A stage in progress resumes on the job's number of ranks only if its newest checkpoint allows it
    (nanochat.reshard): said here, once, before any rank starts."""
    for stage in todo:
        if not any(run.checkpoints_dir(stage).glob("step_*")):
            continue
        from nanochat.checkpoint import complete_checkpoints  # imports torch: only for a stage in progress

        for step_dir in reversed(complete_checkpoints(run.checkpoints_dir(stage))):
            try:  # a damaged one is the ranks' to set aside: the check is on the one they will resume from
                meta = json.loads((step_dir / "meta.json").read_text())
                int(meta["world_size"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            check_world_size(meta, world_size(cfg), f"{stage}'s checkpoint {step_dir.name}")
            break


def vocab_size(cfg, run: Run) -> int:
    from nanochat.tokenizer import Tokenizer

    folder = Path(cfg.tokenizer) if cfg.tokenizer else run.tokenizer_dir
    return Tokenizer.load(folder).get_vocab_size() if Tokenizer.exists(folder) else cfg.tok_train.vocab_size


def writable_ancestor(run: Run) -> Path:
    """The run folder, or the nearest folder above it that exists, when this process can write there."""
    existing = run.root
    while not existing.exists():
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"cannot write the run folder {run.root} ({existing} is not a writable folder); choose "
                        f"another runs_root=")
    return existing


def check_room(folder: Path, checkpoint_bytes: int) -> None:
    """Room for one checkpoint (statvfs: a quota on a network filesystem is not visible here; a save that hits one
    stops in one line then)."""
    if free_bytes(folder) < checkpoint_bytes:
        raise UserError(f"no room for a checkpoint of this model (about {gib(checkpoint_bytes)}) in {folder}: "
                        f"{space_report(folder)}; free space, or choose another runs_root=")
