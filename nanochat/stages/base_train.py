"""Stage base_train: pretrain the GPT on the run's dataset, on 1 CPU, 1 GPU or many GPUs across nodes.

Gradients are reduced by the optimizer (no DDP wrapper). The horizon, batch, learning rates and weight decay come
from the depth dial (nanochat/depth.py), logged at start. The stage resumes from its newest complete checkpoint
by itself: weights, optimizer shards, dataloader position and RNG states are restored, so a run killed at any
point and restarted ends with the same weights, bit for bit on CPU, as one that was never interrupted. It may
resume on any number of ranks that divides `data_shards` (the total batch stays; gradient accumulation adapts):
its steps then read the same rows, and its losses agree to float summation order.
"""

from dataclasses import asdict

import torch

from nanochat import depth as depth_dial
from nanochat.common import print0
from nanochat.config import learning_rates
from nanochat.dataloader import pretraining_loader
from nanochat.dataset import split_files
from nanochat.distributed import compute_dtype
from nanochat.fp8 import enable_fp8, fp8_off
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizer
from nanochat.schedules import lr_multiplier, muon_momentum, muon_weight_decay
from nanochat.stages import SAMPLE_PROMPTS, greedy_samples, load_tokenizer, on_all_ranks
from nanochat.stages.micro_batches import MicroBatches
from nanochat.stages.training import Periodic, TrainingSession
from nanochat.watchdog import WATCHDOG

STAGE = "base_train"


def _train(cfg, run, world, device, tasks) -> dict:
    dtype, dtype_reason = compute_dtype(device.type)
    print0(f"world: {world.world_size} rank(s) on {world.nodes} node(s) via {world.source}, master "
           f"{world.master_addr}:{world.master_port}; device {device}; compute dtype {dtype} ({dtype_reason})")
    tokenizer = load_tokenizer(cfg, run)
    plan = depth_dial.plan(cfg, tokenizer.get_vocab_size(), world.world_size)
    print0(f"base_train plan (depth {cfg.depth}, horizon from {plan.horizon_from}):\n{plan.describe()}")
    n = plan.num_iterations

    torch.manual_seed(cfg.seed)
    model = GPT.build(plan.model, device=device, compute_dtype=dtype)
    if cfg.fp8:
        enable_fp8(model, device, cfg.fp8_recipe)
    lr = {key: value * plan.batch_lr_scale for key, value in learning_rates(cfg).items()}
    optimizer = build_optimizer(model.param_groups(), d_model=plan.model.n_embd, **lr, weight_decay=plan.weight_decay)
    train_config = {"max_seq_len": cfg.max_seq_len, "device_batch_size": cfg.device_batch_size,
                    "total_batch_size": plan.total_batch_size}  # what the chat stages inherit (as upstream's)
    session = TrainingSession(cfg, run, STAGE, world, device, model, optimizer, n,
                              flops_per_token=plan.flops_per_token, reported=("val_bpb", "core_metric"),
                              meta={"model_config": asdict(plan.model), "train_config": train_config})
    resumed = session.resume()
    data_shards = session.data_shards(cfg.data_shards, plan.grad_accum_steps)
    loader_state = resumed["loader"] if resumed else None
    loader = pretraining_loader(tokenizer, split_files(cfg.dataset, "train"), cfg.device_batch_size,
                                cfg.max_seq_len, device=device, state=loader_state, data_shards=data_shards)
    batches = MicroBatches(session, loader, plan.grad_accum_steps, plan.total_batch_size, loader_state)
    val_files, token_bytes = split_files(cfg.dataset, "val"), tokenizer.token_bytes().to(device)

    def val_bpb(step: int) -> dict:
        model.eval()
        val = pretraining_loader(tokenizer, val_files, cfg.device_batch_size, cfg.max_seq_len, device=device)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world.world_size))
        bpb = evaluate_bpb(model, val, steps, token_bytes)
        val.close()
        model.train()
        return {"val_bpb": bpb}

    def samples(step: int) -> None:
        if world.rank == 0:
            for sample in greedy_samples(model, tokenizer, len(SAMPLE_PROMPTS)):
                print0(f"  sample: {sample!r}")

    def schedule(step: int) -> tuple[float, dict]:
        lrm = lr_multiplier(step, n, warmup_steps=plan.warmup_steps, warmdown_ratio=plan.warmdown_ratio,
                            final_lr_frac=plan.final_lr_frac)
        return lrm, {"momentum": muon_momentum(step, n, warmdown_ratio=plan.warmdown_ratio),
                     "weight_decay": muon_weight_decay(step, n, plan.weight_decay)}

    def without_fp8(run):  # evaluations and samples in bf16, as upstream's (nanochat/fp8.py says why)
        def evaluate(step: int):
            with fp8_off(model):
                return run(step)
        return evaluate

    evals = [Periodic(cfg.eval_every, without_fp8(val_bpb)),
             Periodic(cfg.core_metric_every, without_fp8(_core_metric(model, tokenizer, device, cfg)), False),
             Periodic(cfg.sample_every, without_fp8(samples), False)]
    session.train(batches, schedule, evals, batches.rank_state)
    loader.close()
    return session.finish(
        keep_optimizer=_warm_start_follows(cfg),
        val_bpb=session.counters["val_bpb"], core_metric=session.counters["core_metric"],
        params_total=plan.params_total, params_non_embedding=plan.params_non_embedding,
        params_scaling=plan.params_scaling, depth=cfg.depth, total_batch_size=plan.total_batch_size)


def _warm_start_follows(cfg) -> bool:
    """Whether a fine-tuning stage of this run will warm-start from this stage's optimizer state (as upstream's
    chat_sft): only then is it kept, as a d24 one is ~10 GB (a sweep's runs stop at base_eval)."""
    return any(stage in cfg.stages and getattr(cfg, stage).load_optimizer for stage in ("mid_train", "sft"))


def _core_metric(model, tokenizer, device, cfg):
    """CORE while pretraining, every `core_metric_every` steps on at most `core_metric_max_per_task` examples a
    task, as upstream's base_train; said once and skipped when the eval bundle is not staged. It always runs to
    the end, as upstream's (a stop signal is acted on at the next step boundary), so a step's CORE is never half
    done; each example tells the watchdog that this rank is alive."""
    from nanochat.core_eval import STAGE_COMMAND, bundle_staged, evaluate_core

    staged = None

    def run(step: int) -> dict | None:
        nonlocal staged
        if staged is None:
            staged = bundle_staged()
            if not staged:
                print0(f"base_train: no CORE while training, the eval bundle is not staged ({STAGE_COMMAND})")
        if not staged:
            return None
        result = evaluate_core(model, tokenizer, device, max_per_task=cfg.core_metric_max_per_task,
                               should_stop=_alive)
        return {"core_metric": result["core_metric"]}
    return run


def _alive() -> bool:
    WATCHDOG.beat()
    return False


execute = on_all_ranks(_train)
