"""Stage base_eval: the base model's validation bits per byte, the CORE metric and a few greedy samples.

Every rank evaluates its share. Asked to stop (USR2, a preemption), the stage stops at the next batch or example
boundary, keeps the parts it finished in progress.json, requeues the job if that was the request, and the rerun
skips the finished parts.
"""

from nanochat.common import print0
from nanochat.dataloader import pretraining_loader
from nanochat.dataset import split_files
from nanochat.distributed import compute_dtype
from nanochat.loss_eval import evaluate_bpb
from nanochat.model_io import load_model
from nanochat.stages import greedy_samples, input_model, load_tokenizer, on_all_ranks
from nanochat.stages.eval_progress import EvalProgress
from nanochat.tracking import record_summary

STAGE = "base_eval"
NOT_STAGED = "n/a (not staged)"


def _evaluate(cfg, run, world, device, tasks) -> dict:
    source = input_model(cfg, run, STAGE)
    model, meta = load_model(source, device=device, compute_dtype=compute_dtype(device.type)[0])
    model.for_inference()
    tokenizer = load_tokenizer(cfg, run)
    progress = EvalProgress(cfg, run, STAGE, world.rank)

    if "val_bpb" not in progress:
        seq_len = min(cfg.max_seq_len, model.config.sequence_len)
        loader = pretraining_loader(tokenizer, split_files(cfg.dataset, "val"), cfg.device_batch_size, seq_len,
                                    device=device)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * seq_len * world.world_size))
        print0(f"base_eval: val bpb over {steps} batches of {cfg.device_batch_size} x {seq_len} per rank")
        bpb = evaluate_bpb(model, loader, steps, tokenizer.token_bytes().to(device),
                           should_stop=progress.should_stop, progress_label=f"{STAGE} val bpb")
        loader.close()
        if bpb is None:
            progress.halt("during the val bpb pass (it restarts on resume)")
        progress.record(val_bpb=bpb)
        print0(f"base_eval: val bpb {bpb:.4f}")

    if "core_metric" not in progress:
        progress.record(**_core(cfg, model, tokenizer, device, progress))

    samples = greedy_samples(model, tokenizer, cfg.base_eval.samples)
    for sample in samples:
        print0(f"  sample: {sample!r}")
    summary = {**progress.parts, "samples": samples, "model": meta["path"], "model_step": meta["step"]}
    record_summary(cfg, run, STAGE, world.rank, summary)
    return summary


execute = on_all_ranks(_evaluate)


def _core(cfg, model, tokenizer, device, progress) -> dict:
    """The CORE metric, or "n/a (not staged)" when the eval bundle is missing and CORE was not required."""
    if cfg.base_eval.core == "off":
        return {"core_metric": "off"}
    from nanochat.core_eval import (STAGE_COMMAND, EvalBundleMissing, bundle_staged, evaluate_core, load_bundle,
                                    subsample_label)

    if not bundle_staged():  # agreed by every rank
        if cfg.base_eval.core == "required":
            load_bundle()  # raises on a rank without it, saying where it looked
            raise EvalBundleMissing(f"the DCLM eval bundle is missing on another node; stage it with: {STAGE_COMMAND}")
        print0(f"base_eval: CORE {NOT_STAGED}; stage the eval bundle with: {STAGE_COMMAND}")
        return {"core_metric": NOT_STAGED}
    result = evaluate_core(model, tokenizer, device, max_per_task=cfg.base_eval.max_per_task,
                           should_stop=progress.should_stop, progress_label=f"{STAGE} CORE")
    if result is None:
        progress.halt("during CORE (it restarts on resume)")
    note = subsample_label(cfg.base_eval.max_per_task)
    if note:
        result["core_metric_note"] = note
    print0(f"base_eval: CORE {result['core_metric']:.4f}" + (f" ({note})" if note else ""))
    return result
