"""Chat-model evaluation on the task suite, scored as upstream nanochat scores it.

Categorical tasks (ARC, MMLU): one forward pass over the prompt; the answer is the choice letter with the highest
logit at the last prompt position, among the letters offered (no sampling, so no format luck). Generative tasks
(GSM8K, HumanEval, SpellingBee): sample completions with the engine (tools on) and let the task judge them.
ChatCORE is the mean centered accuracy, (acc - baseline) / (1 - baseline), over upstream's five ChatCORE tasks
(CHATCORE_TASKS); SpellingBee and Arithmetic are scored and reported beside it, not in it.

Every rank takes examples rank, rank+W, ...; all ranks run the same number of rounds (some with nothing to do),
so the stop check between rounds is a collective every rank reaches.
"""

import math

import torch

from nanochat.distributed import sum_across_ranks
from nanochat.engine import Engine
from nanochat.progress import Progress


@torch.no_grad()
def _categorical(model, tokenizer, task, conversations: list[dict]) -> list[bool]:
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    width = max(map(len, prompts))
    pad = tokenizer.get_bos_token_id()
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=model.get_device())
    logits = model(ids)  # right padding: position len(p)-1 never sees the pad tokens (causal attention)
    outcomes = []
    for row, (prompt, conversation) in enumerate(zip(prompts, conversations)):
        letters = conversation["letters"]
        letter_ids = [_single_token(tokenizer, letter) for letter in letters]
        scores = logits[row, len(prompt) - 1, letter_ids]
        outcomes.append(bool(task.evaluate(conversation, letters[int(scores.argmax())])))
    return outcomes


def _single_token(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"choice letter {letter!r} is {len(ids)} tokens in this tokenizer; expected one")
    return ids[0]


def _generative(engine, tokenizer, task, conversation: dict, *, num_samples: int, max_new_tokens: int,
                temperature: float, top_k: int, seed: int) -> list[bool]:
    prompt = tokenizer.render_for_completion(conversation)
    sequences, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, seed=seed)
    return [bool(task.evaluate(conversation, tokenizer.decode(seq[len(prompt):]))) for seq in sequences]


def evaluate_task(model, tokenizer, task, *, rank: int = 0, world_size: int = 1, max_examples: int = -1,
                  batch_size: int = 8, num_samples: int = 1, max_new_tokens: int = 256, temperature: float = 0.0,
                  top_k: int = 50, should_stop=None, progress_label: str | None = None) -> dict | None:
    """{"accuracy", "correct", "total"} over the first `max_examples` of `task` (all if -1), summed over ranks;
    with num_samples > 1 an example counts as correct if any sample is (pass@k). None if `should_stop()` (a
    collective, asked between rounds) said to stop. `progress_label`: the label of a progress bar over the
    examples (None: none)."""
    n = len(task) if max_examples < 0 else min(max_examples, len(task))
    per_round = batch_size if task.eval_type == "categorical" else 1
    rounds = math.ceil(math.ceil(n / world_size) / per_round)
    engine = Engine(model, tokenizer)
    was_training = model.training
    model.eval()
    correct = total = 0
    with Progress(n, progress_label or "", unit="example", enabled=progress_label is not None) as bar:
        for r in range(rounds):
            if should_stop is not None and should_stop():
                model.train(was_training)
                return None
            mine = list(range(rank + r * per_round * world_size, n, world_size)[:per_round])
            if not mine:
                outcomes = []
            elif task.eval_type == "categorical":
                outcomes = _categorical(model, tokenizer, task, [task[i] for i in mine])
            else:
                outcomes = [any(_generative(engine, tokenizer, task, task[i], num_samples=num_samples,
                                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                            seed=i))
                            for i in mine]
            correct += sum(outcomes)
            total += len(outcomes)
            bar.update(min(n, (r + 1) * per_round * world_size))  # this round's examples, on every rank
    model.train(was_training)
    correct, total = map(int, sum_across_ranks(correct, total))
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


# upstream's scripts/chat_eval.py all_tasks: ChatCORE is comparable between runs only over this fixed set
CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")


def chatcore(results: dict[str, float], baselines: dict[str, float]) -> float | None:
    """Mean centered accuracy over CHATCORE_TASKS, from `results` (name -> accuracy; other tasks are ignored);
    None unless every one of them was evaluated, as upstream, which does not report a ChatCORE then."""
    if any(name not in results for name in CHATCORE_TASKS):
        return None
    return sum(centered(results[name], baselines[name]) for name in CHATCORE_TASKS) / len(CHATCORE_TASKS)


def ends_turns(model, tokenizer, prompts: list[str], max_tokens: int, rank: int = 0,
               world_size: int = 1) -> list[bool]:
    """For each of this rank's user prompts (rank, rank+W, ...): did the model close its reply with
    <|assistant_end|> within max_tokens (greedy)? A model that has learnt the chat format stops by itself; one
    that has not runs on to the limit."""
    engine, end = Engine(model, tokenizer), tokenizer.encode_special("<|assistant_end|>")
    was_training = model.training
    model.eval()
    ended = []
    for prompt in prompts[rank::world_size]:
        ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": prompt},
                                                            {"role": "assistant", "content": ""}]})
        last = None
        for column, _ in engine.generate(ids, num_samples=1, max_tokens=max_tokens, temperature=0.0):
            last = column[0]
        ended.append(last == end)
    model.train(was_training)
    return ended
