"""Stage base_train: pretrain the GPT on the run's dataset, on 1 CPU, 1 GPU or many GPUs across nodes.

Gradients are reduced by the optimizer (no DDP wrapper). The horizon, batch, learning rates and weight decay come
from the depth dial (nanochat/depth.py), logged at start. The stage resumes from its newest complete checkpoint
by itself: weights, optimizer shards, dataloader position and RNG states are restored, so a run killed at any
point and restarted ends with the same weights, bit for bit on CPU, as one that was never interrupted.
"""

import gc
import time
from dataclasses import asdict

import torch

from nanochat import depth as depth_dial
from nanochat.checkpoint import CheckpointManager, rng_state, set_rng_state, weights_sha256
from nanochat.common import UserError, print0
from nanochat.dataloader import pretraining_loader
from nanochat.dataset import split_files
from nanochat.distributed import agree, compute_dtype, mean_across_ranks, peak_flops
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.preemption import HANDLER, agreed_requeue, stop
from nanochat.optim import apply_schedule, build_optimizer, lr_multiplier, muon_momentum, muon_weight_decay
from nanochat.stages import SAMPLE_PROMPTS, greedy_samples, load_tokenizer, on_all_ranks
from nanochat.tracking import Progress, Tracker

STAGE = "base_train"


def _train(cfg, run, world, device) -> dict:
    dtype, dtype_reason = compute_dtype(device.type)
    print0(f"world: {world.world_size} rank(s) on {world.nodes} node(s) via {world.source}, master "
           f"{world.master_addr}:{world.master_port}; device {device}; compute dtype {dtype} ({dtype_reason})")
    tokenizer = load_tokenizer(cfg, run)
    token_bytes = tokenizer.token_bytes().to(device)
    plan = depth_dial.plan(cfg, tokenizer.get_vocab_size(), world.world_size)
    print0(f"base_train plan (depth {cfg.depth}, horizon from {plan.horizon_from}):\n{plan.describe()}")
    n = plan.num_iterations

    torch.manual_seed(cfg.seed)
    model = GPT.build(plan.model, device=device, compute_dtype=dtype)
    if cfg.fp8:  # before the optimizer and compile see the modules; the weight Parameters are kept
        _enable_fp8(model, device, cfg.fp8_recipe)
    optimizer = build_optimizer(model.param_groups(), d_model=plan.model.n_embd,
                                embedding_lr=cfg.embedding_lr * plan.batch_lr_scale,
                                unembedding_lr=cfg.unembedding_lr * plan.batch_lr_scale,
                                matrix_lr=cfg.matrix_lr * plan.batch_lr_scale,
                                scalar_lr=cfg.scalar_lr * plan.batch_lr_scale, weight_decay=plan.weight_decay)
    checkpoints = CheckpointManager(run.checkpoints_dir(STAGE), world.rank, world.world_size,
                                    keep=cfg.keep_checkpoints, async_save=device.type == "cuda")
    metrics = run.metrics(STAGE)
    counters = {"step": 0, "tokens": 0, "elapsed": 0.0, "train_time": 0.0, "loss": float("nan"), "val_bpb": None,
                "resumes": 0, "requeues": 0}
    loader_state = None
    resumed = checkpoints.load(device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        if resumed["optim"] is not None:
            optimizer.load_state_dict(resumed["optim"])
        elif resumed["step"] < n:
            raise UserError(f"checkpoint {resumed['path']} has no optimizer state; cannot resume training from it")
        counters = {**resumed["meta"]["counters"], "resumes": resumed["meta"]["counters"]["resumes"] + 1}
        loader_state = resumed["rank_state"]["loader"]
        set_rng_state(resumed["rank_state"]["rng"])
        if world.rank == 0:  # rows past the checkpoint will be logged again; an eval at its step is redone
            s = counters["step"]
            metrics.rewind(lambda row: row["step"] < s or (row["step"] == s and "val_bpb" not in row))
        print0(f"resumed from {resumed['path'].name} (step {counters['step']}/{n})")
        del resumed
    train_model = torch.compile(model, dynamic=False) if (cfg.compile and device.type == "cuda") else model
    scaler = torch.amp.GradScaler() if dtype == torch.float16 else None

    shards_per_rank = (cfg.data_shards or world.world_size) // world.world_size
    if plan.grad_accum_steps % max(1, shards_per_rank):
        raise UserError(f"data_shards={cfg.data_shards} gives each rank {shards_per_rank} data shards, which must "
                        f"divide its {plan.grad_accum_steps} gradient-accumulation steps")
    train_loader = pretraining_loader(tokenizer, split_files(cfg.dataset, "train"), cfg.device_batch_size,
                                      cfg.max_seq_len, device=device, state=loader_state, data_shards=cfg.data_shards)
    val_files = split_files(cfg.dataset, "val")
    gpu_type = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(gpu_type) if device.type == "cuda" else float("inf")
    tracker = Tracker(cfg, run, STAGE, rank=world.rank)
    progress = Progress(n, enabled=world.rank == 0)

    def log(row: dict) -> None:
        row = {**row, "tokens": counters["tokens"], "flops": plan.flops_per_token * counters["tokens"],
               "time": time.time() - stage_start}
        if world.rank == 0:
            metrics.log(row)
        tracker.log(row)

    def eval_bpb() -> float:
        model.eval()
        loader = pretraining_loader(tokenizer, val_files, cfg.device_batch_size, cfg.max_seq_len, device=device)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world.world_size))
        bpb = evaluate_bpb(model, loader, steps, token_bytes)
        loader.close()
        model.train()
        return bpb

    stage_start = time.time() - counters["elapsed"]
    last_save = time.time()
    x, y, batch_state = next(train_loader)
    consumed_state = loader_state  # the loader state before (x, y): what a checkpoint must record
    step = counters["step"]
    while True:
        if cfg.eval_every > 0 and (step == n or step % cfg.eval_every == 0):
            counters["val_bpb"] = eval_bpb()
            print0(f"step {step:05d} | val bpb {counters['val_bpb']:.4f}")
            log({"step": step, "val_bpb": counters["val_bpb"]})
        if world.rank == 0 and cfg.sample_every > 0 and (step == n or (step > 0 and step % cfg.sample_every == 0)):
            for sample in greedy_samples(model, tokenizer, len(SAMPLE_PROMPTS)):
                print0(f"  sample: {sample!r}")
        if step == n:
            break

        _synchronize(device)
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(plan.grad_accum_steps):
            loss = train_model(x, y)
            loss_sum += loss.detach()
            loss = loss / plan.grad_accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
            consumed_state = batch_state
            x, y, batch_state = next(train_loader)  # the loader thread prepared it while this step computed
        lrm = lr_multiplier(step, n, warmup_steps=plan.warmup_steps, warmdown_ratio=plan.warmdown_ratio,
                            final_lr_frac=plan.final_lr_frac)
        apply_schedule(optimizer, lrm, momentum=muon_momentum(step, n, warmdown_ratio=plan.warmdown_ratio),
                       weight_decay=muon_weight_decay(step, n, plan.weight_decay))
        if scaler:
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        # the loss of the whole global batch, not of one micro-batch: comparable across world sizes
        loss_value = mean_across_ranks(loss_sum / plan.grad_accum_steps).item()
        _synchronize(device)
        dt = time.time() - t0
        step += 1
        counters.update(step=step, loss=loss_value, tokens=counters["tokens"] + plan.total_batch_size,
                        train_time=counters["train_time"] + dt)
        if loss_value != loss_value or abs(loss_value) == float("inf"):
            raise RuntimeError(f"loss is {loss_value} at step {step}: training diverged")
        tok_per_sec = plan.total_batch_size / dt
        mfu = 100 * plan.flops_per_token * tok_per_sec / (peak * world.world_size)
        log({"step": step, "loss": loss_value, "lrm": lrm, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu})
        progress.update(step, f"loss {loss_value:.4f} | lrm {lrm:.2f} | {tok_per_sec:,.0f} tok/s | mfu {mfu:.1f}%")

        checkpoints.poll()
        overdue = cfg.save_every_minutes > 0 and time.time() - last_save > 60 * cfg.save_every_minutes
        # one all-reduce: a signal reached some rank; some rank's save timer fired (clocks differ between nodes)
        stopping, overdue = agree(HANDLER.requested, overdue)
        stopping = stopping and step < n
        requeue_job = stopping and agreed_requeue(counters["requeues"], cfg.max_requeues)
        counters["requeues"] += int(requeue_job)  # counted in the checkpoint saved next
        if stopping or step == n or overdue or (cfg.save_every > 0 and step % cfg.save_every == 0):
            counters["elapsed"] = time.time() - stage_start
            checkpoints.save(step, model.state_dict() if world.rank == 0 else None, optimizer.state_dict(),
                             {"loader": consumed_state, "rng": rng_state()},
                             {"counters": counters, "num_iterations": n, "model_config": asdict(plan.model),
                              "stage": STAGE})
            last_save = time.time()
        if stopping:
            checkpoints.wait()
            train_loader.close()
            stop(f"base_train stopped at step {step}/{n} after saving a checkpoint", requeue_job, world.rank)
        if gc.get_freeze_count() == 0:  # setup garbage is done: freeze it so the collector stops rescanning it
            gc.collect()
            gc.freeze()
    train_loader.close()
    progress.close()
    checkpoints.finish()

    wall = time.time() - stage_start
    train_time = counters["train_time"]
    summary = {
        "step": step, "loss": counters["loss"], "val_bpb": counters["val_bpb"], "tokens": counters["tokens"],
        "flops": plan.flops_per_token * counters["tokens"], "wall_time_s": wall,
        "tok_per_sec": counters["tokens"] / train_time if train_time else 0.0,
        "mfu": 100 * plan.flops_per_token * counters["tokens"] / train_time / (peak * world.world_size)
        if train_time else 0.0,
        "params_total": plan.params_total, "params_non_embedding": plan.params_non_embedding,
        "params_scaling": plan.params_scaling, "depth": cfg.depth, "world_size": world.world_size,
        "gpu_type": gpu_type, "gpu_hours": wall * world.world_size / 3600 if device.type == "cuda" else 0.0,
        "requeues": counters["requeues"], "resumes": counters["resumes"],
        "weights_sha256": weights_sha256(model.state_dict()),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "total_batch_size": plan.total_batch_size, "num_iterations": n,
        "checkpoint": str(checkpoints.complete()[-1]) if checkpoints.complete() else None,
    }
    tracker.finish(summary)
    return summary


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _enable_fp8(model, device, recipe: str) -> None:
    """torchao's Float8Linear on the block matrices; fp8 tensor cores start at SM89 (Ada, Hopper)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError("fp8=true needs an SM89+ GPU (H100, L40S, RTX 4090); this device has none")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("fp8=true needs torchao: pip install -e '.[gpu]'") from None

    def eligible(module, fqn: str) -> bool:  # fp8 GEMMs want dims divisible by 16; tiny ones gain nothing
        return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
                and module.out_features % 16 == 0 and min(module.in_features, module.out_features) >= 128)

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=eligible)


run = on_all_ranks(_train)
