"""Pipeline stages: the functions that nanochat.stage_table names, each `(cfg, run, tasks) -> dict` (`tasks`: what
the pipeline built for the stage to train or evaluate on, None for the stages that need none); the returned dict
becomes the stage's summary.json, which the pipeline writes last."""

import time
from pathlib import Path

from nanochat.common import UserError
from nanochat.runs import Run
from nanochat.stage_table import BY_NAME
from nanochat.tokenizer import Tokenizer


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If 5*x + 3 = 13, then x is",
                  "The opposite of hot is", "The planets of the solar system are:", "def fibonacci(n):"]


def on_all_ranks(body):
    """Turn `body(cfg, run, world, device, tasks)` into a stage function: join the process group first (one rank
    or many, from torchrun's or Slurm's variables) and leave it afterwards, whatever happens. Adds where and on
    what it ran, and the GPU-hours spent (the one place they are computed)."""
    def execute(cfg, run: Run, tasks=None) -> dict:
        from nanochat.distributed import autodetect_device, cleanup_distributed, init_distributed
        from nanochat.stages.training import device_name

        world, device = init_distributed(cfg.device or autodetect_device(), cfg.startup_timeout_s, cfg.step_timeout_s)
        start = time.time()
        try:
            summary = body(cfg, run, world, device, tasks)
        finally:
            cleanup_distributed()
        wall = summary.get("wall_time_s", time.time() - start)  # training stages count across resumes
        return {"wall_time_s": wall, "world_size": world.world_size, "nodes": world.nodes,
                "gpu_type": device_name(device),
                "gpu_hours": wall * world.world_size / 3600 if device.type == "cuda" else 0.0, **summary}

    return execute


def greedy_samples(model, tokenizer, count: int, max_tokens: int = 16) -> list[str]:
    """Greedy completions of the first `count` fixed prompts: a periodic look at what the model says."""
    from nanochat.engine import Engine

    was_training = model.training
    model.eval()
    engine, samples = Engine(model, tokenizer), []
    for prompt in SAMPLE_PROMPTS[:count]:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        (sequence,), _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        samples.append(tokenizer.decode(sequence[1:]))
    model.train(was_training)
    return samples


def input_model(cfg, run: Run, stage: str):
    """The model `stage` starts from (its row of the stage table): `<input_key>=PATH` when given, else the first
    of its input stages done in this run."""
    spec = BY_NAME[stage]
    path = getattr(cfg, spec.input_key)
    if path:
        return path
    for candidate in spec.inputs:
        if run.is_done(candidate):
            return run.stage_dir(candidate)
    first = spec.inputs[-1]
    raise UserError(f"{stage} needs a {BY_NAME[first].makes} model: run {first} first (stages=[{first},{stage}]) "
                    f"or pass {spec.input_key}=PATH")


def tokenizer_dir(cfg, run: Run) -> Path:
    """Where the stages load the tokenizer from: the folder named by `tokenizer=` (ours or upstream nanochat's),
    else this run's tok_train output; a UserError when there is none (the login node checks it at submission)."""
    folder = Path(cfg.tokenizer) if cfg.tokenizer else run.tokenizer_dir
    if Tokenizer.exists(folder):
        return folder
    if cfg.tokenizer:
        raise UserError(f"tokenizer={cfg.tokenizer} holds no tokenizer (tokenizer.json, or upstream's tokenizer.pkl)")
    raise UserError(f"run {run.root.name} has no tokenizer: run the tok_train stage first "
                    f"(stages=[tok_train,...]) or pass tokenizer=PATH")


def load_tokenizer(cfg, run: Run) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir(cfg, run))
