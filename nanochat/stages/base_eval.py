"""Stage base_eval: the base model's validation bits per byte, the CORE metric and a few greedy samples.

Every rank evaluates its share. Asked to stop (USR2, a preemption), the stage stops at the next batch or example
boundary, keeps the parts it finished in progress.json, requeues the job if that was the request, and the rerun
skips the finished parts.
"""

import json

from nanochat.common import UserError, atomic_write_json, print0
from nanochat.dataloader import pretraining_loader
from nanochat.dataset import split_files
from nanochat.distributed import agree, compute_dtype
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_io import load_model
from nanochat.preemption import HANDLER, agreed_requeue, stop
from nanochat.stages import greedy_samples, load_tokenizer, on_all_ranks

STAGE = "base_eval"
NOT_STAGED = "n/a (not staged)"


def _evaluate(cfg, run, world, device) -> dict:
    source = cfg.base_checkpoint or (run.stage_dir("base_train") if run.is_done("base_train") else None)
    if source is None:
        raise UserError("base_eval needs a base model: run base_train first (stages=[base_train,base_eval]) or "
                        "pass base_checkpoint=PATH")
    model, meta = load_model(source, device=device, compute_dtype=compute_dtype(device.type)[0])
    tokenizer = load_tokenizer(cfg, run)
    progress_path = run.stage_dir(STAGE) / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"requeues": 0}

    def should_stop() -> bool:
        return agree(HANDLER.requested)[0]

    def save_progress() -> None:
        if world.rank == 0:
            atomic_write_json(progress_path, progress)

    def halt(where: str) -> None:
        requeue_job = agreed_requeue(progress["requeues"], cfg.max_requeues)
        progress["requeues"] += int(requeue_job)
        save_progress()
        stop(f"base_eval stopped {where}; finished parts are kept", requeue_job, world.rank)

    if "val_bpb" not in progress:
        seq_len = min(cfg.max_seq_len, model.config.sequence_len)
        loader = pretraining_loader(tokenizer, split_files(cfg.dataset, "val"), cfg.device_batch_size, seq_len,
                                    device=device)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * seq_len * world.world_size))
        print0(f"base_eval: val bpb over {steps} batches of {cfg.device_batch_size} x {seq_len} per rank")
        bpb = evaluate_bpb(model, loader, steps, tokenizer.token_bytes().to(device), should_stop=should_stop)
        loader.close()
        if bpb is None:
            halt("during the val bpb pass (it restarts on resume)")
        progress["val_bpb"] = bpb
        save_progress()
        print0(f"base_eval: val bpb {bpb:.4f}")

    if "core_metric" not in progress:
        progress.update(_core(cfg, model, tokenizer, device, should_stop, halt))
        save_progress()

    samples = greedy_samples(model, tokenizer, cfg.base_eval.samples)
    for sample in samples:
        print0(f"  sample: {sample!r}")
    return {**progress, "samples": samples, "model": meta["path"], "model_step": meta["step"]}


run = on_all_ranks(_evaluate)


def _core(cfg, model, tokenizer, device, should_stop, halt) -> dict:
    """The CORE metric, or "n/a (not staged)" when the eval bundle is missing and CORE was not required."""
    if cfg.base_eval.core not in ("auto", "required", "off"):
        raise UserError(f"base_eval.core={cfg.base_eval.core!r}; valid: auto, required, off")
    if cfg.base_eval.core == "off":
        return {"core_metric": "off"}
    from nanochat.core_eval import EvalBundleMissing, evaluate_core

    try:
        result = evaluate_core(model, tokenizer, device, max_per_task=cfg.core_metric_max_per_task,
                               should_stop=should_stop)
    except EvalBundleMissing:
        if cfg.base_eval.core == "required":
            raise
        print0(f"base_eval: CORE {NOT_STAGED}; stage the eval bundle with: python -m nanochat.dataset --assets-only")
        return {"core_metric": NOT_STAGED}
    if result is None:
        halt("during CORE (it restarts on resume)")
    print0(f"base_eval: CORE {result['core_metric']:.4f}")
    return result
