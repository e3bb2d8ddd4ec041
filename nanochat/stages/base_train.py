"""Stage base_train: pretrain the GPT on the run's dataset, on 1 CPU, 1 GPU or many GPUs across nodes.

Gradients are reduced by the optimizer (no DDP wrapper). The horizon, batch, learning rates and weight decay come
from the depth dial (nanochat/depth.py), logged at start. The stage resumes from its newest complete checkpoint
by itself: weights, optimizer shards, dataloader position and RNG states are restored, so a run killed at any
point and restarted ends with the same weights, bit for bit on CPU, as one that was never interrupted.
"""

import time
from dataclasses import asdict

import torch

from nanochat import depth as depth_dial
from nanochat.common import UserError, print0
from nanochat.dataloader import pretraining_loader
from nanochat.dataset import split_files
from nanochat.distributed import compute_dtype, mean_across_ranks
from nanochat.gpt import GPT
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import apply_schedule, build_optimizer, lr_multiplier, muon_momentum, muon_weight_decay
from nanochat.stages import SAMPLE_PROMPTS, greedy_samples, load_tokenizer, on_all_ranks
from nanochat.stages.training import TrainingSession, synchronize

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
    session = TrainingSession(cfg, run, STAGE, world, device, model, optimizer, n,
                              flops_per_token=plan.flops_per_token,
                              meta={"model_config": asdict(plan.model), "train_config": _train_config(cfg, plan)})
    session.counters["val_bpb"] = None
    resumed = session.resume()
    loader_state = resumed["loader"] if resumed else None
    train_model = torch.compile(model, dynamic=False) if (cfg.compile and device.type == "cuda") else model
    scaler = torch.amp.GradScaler() if dtype == torch.float16 else None

    shards_per_rank = (cfg.data_shards or world.world_size) // world.world_size
    if plan.grad_accum_steps % max(1, shards_per_rank):
        raise UserError(f"data_shards={cfg.data_shards} gives each rank {shards_per_rank} data shards, which must "
                        f"divide its {plan.grad_accum_steps} gradient-accumulation steps")
    train_loader = pretraining_loader(tokenizer, split_files(cfg.dataset, "train"), cfg.device_batch_size,
                                      cfg.max_seq_len, device=device, state=loader_state, data_shards=cfg.data_shards)
    val_files = split_files(cfg.dataset, "val")
    session.on_stop.append(train_loader.close)

    def eval_bpb() -> float:
        model.eval()
        loader = pretraining_loader(tokenizer, val_files, cfg.device_batch_size, cfg.max_seq_len, device=device)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world.world_size))
        bpb = evaluate_bpb(model, loader, steps, token_bytes)
        loader.close()
        model.train()
        return bpb

    x, y, batch_state = next(train_loader)
    consumed_state = loader_state  # the loader state before (x, y): what a checkpoint must record
    step = session.step
    while True:
        if cfg.eval_every > 0 and (step == n or step % cfg.eval_every == 0):
            session.record_eval(step, val_bpb=eval_bpb())
        if world.rank == 0 and cfg.sample_every > 0 and (step == n or (step > 0 and step % cfg.sample_every == 0)):
            for sample in greedy_samples(model, tokenizer, len(SAMPLE_PROMPTS)):
                print0(f"  sample: {sample!r}")
        if step == n:
            break

        synchronize(device)
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
        synchronize(device)
        session.end_step(loss_value, plan.total_batch_size, time.time() - t0, {"lrm": lrm},
                         lambda: {"loader": consumed_state}, text=f" | lrm {lrm:.2f}")
        step = session.step
    train_loader.close()
    return session.finish(
        val_bpb=session.counters["val_bpb"], params_total=plan.params_total,
        params_non_embedding=plan.params_non_embedding, params_scaling=plan.params_scaling, depth=cfg.depth,
        total_batch_size=plan.total_batch_size)


def _train_config(cfg, plan) -> dict:
    """What the chat stages inherit from pretraining (upstream's meta keeps the same under "user_config")."""
    return {"max_seq_len": cfg.max_seq_len, "device_batch_size": cfg.device_batch_size,
            "total_batch_size": plan.total_batch_size, "embedding_lr": cfg.embedding_lr,
            "unembedding_lr": cfg.unembedding_lr, "matrix_lr": cfg.matrix_lr, "scalar_lr": cfg.scalar_lr}


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
