"""Stages sft and mid_train: fine-tune on a conversation mixture, with the loss only on what the assistant writes
(the loader's mask). Sequence length and batch sizes are inherited from the base checkpoint unless set, as
upstream does. Resumes exactly like base_train: weights, optimizer, loader position and RNG come back from the
newest complete checkpoint (see training.py), on any number of ranks that divides `<stage>.data_shards`."""

import math
from dataclasses import asdict
from pathlib import Path

from nanochat.chat_scoring import evaluate_task
from nanochat.common import UserError, print0
from nanochat.dataloader import conversation_loader
from nanochat.distributed import compute_dtype
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_io import load_model
from nanochat.stages import input_model, load_tokenizer, on_all_ranks
from nanochat.stages.micro_batches import MicroBatches
from nanochat.stages.training import Periodic, TrainingSession, fine_tuning_optimizer, warm_start


def lr_multiplier(step: int, num_iterations: int, *, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.5,
                  final_lr_frac: float = 0.0) -> float:
    """As upstream's chat_sft: up linearly over the first `warmup_ratio` of the steps, flat, then linearly down to
    `final_lr_frac` over the last `warmdown_ratio`."""
    progress = step / num_iterations
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1.0 - decay) + decay * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon's momentum 0.85 -> 0.95 over the first 300 steps, then 0.95, as upstream's chat_sft."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def _inherit(meta: dict, key: str, value: int, stage: str) -> int:
    if value > 0:
        return value
    for section in ("train_config", "user_config"):  # ours, upstream's
        if key in meta.get(section, {}):
            return int(meta[section][key])
    raise UserError(f"the input checkpoint does not record {key}; set {stage}.{key}=N")


def epoch_steps(mixture, tokenizer, seq_len: int, total_batch_size: int) -> int:
    """Steps for one epoch: the mixture's length times its mean conversation length (from up to 1000 evenly spaced
    conversations, the same ones every time, so a resumed run computes the same horizon)."""
    sample = range(0, len(mixture), max(1, len(mixture) // 1000))
    mean = sum(len(tokenizer.render_conversation(mixture[i], max_tokens=seq_len + 1)[0]) for i in sample) / len(sample)
    return max(1, math.ceil(len(mixture) * mean / total_batch_size))


def finetune_stage(stage: str):
    def train(cfg, run, world, device, tasks) -> dict:
        fcfg = getattr(cfg, stage)
        source = input_model(cfg, run, stage)
        model, meta = load_model(source, device=device, compute_dtype=compute_dtype(device.type)[0])
        model.train()
        tokenizer = load_tokenizer(cfg, run)
        T = min(_inherit(meta, "max_seq_len", fcfg.max_seq_len, stage), model.config.sequence_len)
        B = _inherit(meta, "device_batch_size", fcfg.device_batch_size, stage)
        total = _inherit(meta, "total_batch_size", fcfg.total_batch_size, stage)
        if total % (B * T * world.world_size):
            raise UserError(f"{stage}: total_batch_size {total} is not a multiple of device_batch_size x max_seq_len "
                            f"x ranks = {B} x {T} x {world.world_size}")
        accum = total // (B * T * world.world_size)
        n = fcfg.num_iterations if fcfg.num_iterations > 0 else epoch_steps(tasks.train, tokenizer, T, total)
        print0(f"{stage}: from {meta['path']}; {len(tasks.train):,} conversations; {n} steps of {total:,} tokens "
               f"({B} x {T} x {world.world_size} ranks x {accum} accumulation)")

        optimizer = fine_tuning_optimizer(model, cfg, fcfg.init_lr_frac, fcfg.weight_decay)
        train_config = {"max_seq_len": T, "device_batch_size": B, "total_batch_size": total}
        session = TrainingSession(cfg, run, stage, world, device, model, optimizer, n,
                                  flops_per_token=model.estimate_flops(), reported=("val_bpb",),
                                  meta={"model_config": asdict(model.config), "train_config": train_config,
                                        "source": meta["path"]})
        resumed = session.resume()
        data_shards = session.data_shards(fcfg.data_shards, accum)
        if resumed is None and fcfg.load_optimizer:
            warm_start(session, Path(meta["path"]).parent)
        state = resumed["loader"] if resumed else None
        loader = conversation_loader(tokenizer, tasks.train, B, T, device=device, state=state, data_shards=data_shards)
        batches = MicroBatches(session, loader, accum, total, state)
        token_bytes = tokenizer.token_bytes().to(device)

        def val_bpb(step: int) -> dict:
            model.eval()
            val = conversation_loader(tokenizer, tasks.val, B, T, device=device)
            bpb = evaluate_bpb(model, val, max(1, fcfg.eval_tokens // (B * T * world.world_size)), token_bytes)
            val.close()
            model.train()
            return {"val_bpb": bpb}

        def chat_eval(step: int) -> dict:
            return {name: evaluate_task(model, tokenizer, task, rank=world.rank, world_size=world.world_size,
                                        max_examples=fcfg.chat_eval_examples)["accuracy"]
                    for name, task in tasks.quick.items()}

        evals = [Periodic(fcfg.eval_every, val_bpb), Periodic(fcfg.chat_eval_every if tasks.quick else 0, chat_eval)]
        def schedule(step: int) -> tuple[float, dict]:
            return (lr_multiplier(step, n, warmup_ratio=fcfg.warmup_ratio, warmdown_ratio=fcfg.warmdown_ratio,
                                  final_lr_frac=fcfg.final_lr_frac), {"momentum": muon_momentum(step)})

        session.train(batches, schedule, evals, batches.rank_state)
        loader.close()
        quick = {name: session.counters[name] for name in tasks.quick if name in session.counters}
        return session.finish(val_bpb=session.counters["val_bpb"], **quick, depth=model.config.n_layer,
                              total_batch_size=total, source=meta["path"])

    return on_all_ranks(train)


sft = finetune_stage("sft")
mid_train = finetune_stage("mid_train")
