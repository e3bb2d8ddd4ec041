"""Pipeline stages. Each module has `run(cfg: Config, run: Run) -> dict`; the returned dict becomes the stage's
summary.json, which the pipeline writes last."""

import importlib
import time

from nanochat.common import UserError
from nanochat.runs import Run
from nanochat.tokenizer import Tokenizer



def stage_runner(name: str):
    return importlib.import_module(f"nanochat.stages.{name}").run


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If 5*x + 3 = 13, then x is",
                  "The opposite of hot is", "The planets of the solar system are:", "def fibonacci(n):"]


def on_all_ranks(body):
    """Turn `body(cfg, run, world, device)` into a stage's `run(cfg, run)`: join the process group first (one
    rank or many, from torchrun's or Slurm's variables) and leave it afterwards, whatever happens."""
    def run(cfg, run_folder: Run) -> dict:
        import torch

        from nanochat.distributed import autodetect_device, cleanup_distributed, init_distributed

        world, device = init_distributed(cfg.device or autodetect_device())
        start = time.time()
        try:
            summary = body(cfg, run_folder, world, device)
        finally:
            cleanup_distributed()
        wall = time.time() - start  # training stages count across resumes and report their own
        cuda = device.type == "cuda"
        return {"wall_time_s": wall, "world_size": world.world_size, "nodes": world.nodes,
                "gpu_type": torch.cuda.get_device_name(device) if cuda else "cpu",
                "gpu_hours": wall * world.world_size / 3600 if cuda else 0.0, **summary}

    return run


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


def input_model(run: Run, stage: str, path: str | None, key: str, candidates: list[str], kind: str):
    """The model `stage` starts from: `key=PATH` when given, else the first of `candidates` done in this run."""
    if path:
        return path
    for candidate in candidates:
        if run.is_done(candidate):
            return run.stage_dir(candidate)
    first = candidates[-1]
    raise UserError(f"{stage} needs a {kind} model: run {first} first (stages=[{first},{stage}]) or pass {key}=PATH")


def load_tokenizer(cfg, run: Run) -> Tokenizer:
    """This run's tokenizer, or the folder named by `tokenizer=` (ours or upstream nanochat's)."""
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if not (run.tokenizer_dir / "tokenizer.pkl").is_file():
        raise UserError(f"run {run.root.name} has no tokenizer: run the tok_train stage first "
                        f"(stages=[tok_train,...]) or pass tokenizer=PATH")
    return Tokenizer.load(run.tokenizer_dir)
