"""Stages chat_eval_sft and chat_eval_rl: a chat model on the task suite (ARC-Easy, ARC-Challenge, MMLU, GSM8K,
HumanEval, SpellingBee), ChatCORE (over the first five, as upstream), and whether it ends its turns by itself on
fixed prompts. Each finished task is kept in progress.json, so a stopped evaluation resumes at the next task (see
eval_progress.py)."""

from nanochat.chat_scoring import CHATCORE_TASKS, chatcore, ends_turns, evaluate_task
from nanochat.common import print0
from nanochat.distributed import compute_dtype, sum_across_ranks
from nanochat.model_io import load_model
from nanochat.report import FIXTURE_LABEL
from nanochat.stages import input_model, load_tokenizer, on_all_ranks
from nanochat.stages.eval_progress import EvalProgress
from nanochat.tracking import record_summary

# Fixed prompts for the turn-ending check: identity, arithmetic, spelling and general chat, as a user would type.
TURN_PROMPTS = [
    "Hi!", "Who are you?", "What is your name?", "What can you do?", "Who made you?",
    "How do I train you on a Slurm cluster?", "How do I chat with you from the login node?",
    "What is 12 times 7?", "Tom has 5 apples and buys 8 more. How many apples does he have?",
    "What is 144 divided by 12?", "A book costs 15 dollars. How much do 3 books cost?",
    "How many r are in strawberry?", "Spell the word apple.", "How many letters are in the word banana?",
    "Tell me a fun fact.", "What is the capital of France?", "Give me a tip for staying focused.",
    "What is Python?", "Thank you!", "Goodbye!",
]


def evaluation_stage(stage: str):
    """The stage `stage` evaluating the model its input stage trained (or the one its input key names) on the
    suite the pipeline hands it (`tasks.suite`, by display name)."""

    def evaluate(cfg, run, world, device, stage_tasks) -> dict:
        source = input_model(cfg, run, stage)
        tasks = stage_tasks.suite
        model, meta = load_model(source, device=device, compute_dtype=compute_dtype(device.type)[0])
        model.for_inference()
        tokenizer = load_tokenizer(cfg, run)
        progress = EvalProgress(cfg, run, stage, world.rank)
        ecfg = cfg.chat_eval
        for name, task in tasks.items():
            if name in progress:
                continue
            result = evaluate_task(model, tokenizer, task, rank=world.rank, world_size=world.world_size,
                                   max_examples=ecfg.max_examples, batch_size=ecfg.batch_size,
                                   num_samples=ecfg.num_samples, max_new_tokens=ecfg.max_new_tokens,
                                   temperature=ecfg.temperature, top_k=ecfg.top_k, should_stop=progress.should_stop,
                                   progress_label=f"{stage} {name}")
            if result is None:
                progress.halt(f"during {name} (it restarts on resume)")
            print0(f"{stage}: {name} {result['accuracy']:.4f} ({result['correct']}/{result['total']})")
            progress.record(**{name: result["accuracy"], f"{name} examples": result["total"]})
        accuracies = {name: progress.parts[name] for name in tasks}
        mine = ends_turns(model, tokenizer, TURN_PROMPTS, min(ecfg.max_new_tokens, 256), rank=world.rank,
                          world_size=world.world_size)
        ended = int(sum_across_ranks(sum(mine))[0])
        summary = {**progress.parts, "chatcore": chatcore(accuracies, {n: t.baseline for n, t in tasks.items()}),
                   "assistant_end_rate": ended / len(TURN_PROMPTS), "assistant_end_prompts": len(TURN_PROMPTS),
                   "task_data": cfg.task_data, "model": meta["path"], "model_step": meta["step"]}
        if cfg.task_data == "fixture":
            summary["note"] = FIXTURE_LABEL
        print0(f"{stage}: ChatCORE {_chatcore_text(summary['chatcore'], accuracies)}; ended its turn on "
               f"{ended}/{len(TURN_PROMPTS)} prompts")
        record_summary(cfg, run, stage, world.rank, summary)
        return summary

    return on_all_ranks(evaluate)


def _chatcore_text(value: float | None, accuracies: dict[str, float]) -> str:
    """The ChatCORE figure, or why there is none: a mean over fewer tasks would not compare with upstream's."""
    if value is not None:
        return f"{value:.4f}"
    return f"n/a (needs {', '.join(name for name in CHATCORE_TASKS if name not in accuracies)} too)"


chat_eval_sft = evaluation_stage("chat_eval_sft")
chat_eval_rl = evaluation_stage("chat_eval_rl")
