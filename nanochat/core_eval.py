"""The CORE metric of the DCLM paper (arXiv:2406.11794), computed the way upstream nanochat computes it.

The DCLM eval bundle (staged by `python -m nanochat.dataset --assets-only`) lives in
$NANOCHAT_BASE_DIR/eval_bundle/:
    core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [n], icl_task_type, continuation_delimiter}]
    eval_data/<uri>      one JSON object per line
    eval_meta_data.csv   columns "Eval Task" and "Random baseline" (a percentage)

Per example: draw `num_fewshot` other examples (random.Random(1234 + idx), never the example itself), render
one token sequence per candidate, forward them as one batch and
  - multiple_choice (a query, several choices) / schema (several contexts, one continuation): the candidate
    with the lowest mean cross-entropy over its continuation tokens is the answer;
  - language_modeling: correct iff the greedy (argmax) token at every continuation position is the
    continuation's token.
Per task the examples are shuffled with random.Random(1337) (so max_per_task takes a fair subset), rank r of
w evaluates examples r::w and the correct counts are summed over ranks. centered = (acc - b) / (1 - b) with
b the random baseline in [0, 1]; CORE is the mean centered accuracy over the tasks.
"""

import csv
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from nanochat.common import UserError, get_base_dir
from nanochat.progress import Progress

STAGE_COMMAND = "python -m nanochat.dataset --assets-only"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # the per-task data order
FEWSHOT_SEED = 1234  # + the example's index: its few-shot draw


# ---------------------------------------------------------------------------------------------------------
# the bundle


class EvalBundleMissing(UserError):
    """The bundle is not staged at all (a malformed bundle raises a plain UserError)."""


def default_bundle_dir() -> Path:
    return get_base_dir() / "eval_bundle"


def load_bundle(bundle_dir=None) -> list[dict]:
    """The bundle's tasks in core.yaml order: dicts with label, task_type, num_fewshot, continuation_delimiter,
    baseline (a fraction) and data_path."""
    import yaml

    bundle = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    config_path, meta_path = _index_files(bundle)
    if not config_path.is_file() or not meta_path.is_file():
        raise EvalBundleMissing(f"the DCLM eval bundle is not staged in {bundle} (no core.yaml / "
                                f"eval_meta_data.csv); stage it with: {STAGE_COMMAND}")
    config = yaml.safe_load(config_path.read_text()) or {}
    with open(meta_path, newline="") as f:
        baselines = {row["Eval Task"].strip(): float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for entry in config.get("icl_tasks") or []:
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise UserError(f"eval bundle task {label!r} has unsupported icl_task_type {task_type!r}")
        if label not in baselines:
            raise UserError(f"eval bundle task {label!r} has no random baseline in {meta_path}")
        shots = entry.get("num_fewshot", 0)
        uri = entry["dataset_uri"]
        data_path = bundle / "eval_data" / uri
        if not data_path.is_file() and (bundle / "eval_data" / f"{uri}.jsonl").is_file():
            data_path = bundle / "eval_data" / f"{uri}.jsonl"
        if not data_path.is_file():
            raise UserError(f"eval bundle task {label!r}: {data_path} is missing; re-stage with: {STAGE_COMMAND}")
        tasks.append({
            "label": label,
            "task_type": task_type,
            "num_fewshot": int(shots[0] if isinstance(shots, (list, tuple)) else shots),
            "continuation_delimiter": entry.get("continuation_delimiter", " "),
            "baseline": baselines[label] / 100.0,  # stored as a percentage
            "data_path": data_path,
        })
    if not tasks:
        raise UserError(f"{config_path} lists no icl_tasks")
    return tasks


def load_task_data(task: dict, max_per_task: int = -1) -> list[dict]:
    with open(task["data_path"]) as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


# ---------------------------------------------------------------------------------------------------------
# prompts: few-shot blocks are separated by a blank line; each block is <context><delimiter><continuation>


def fewshot_indices(idx: int, n: int, num_fewshot: int) -> list[int]:
    """The few-shot examples for example `idx` of `n`: a fixed draw that never includes `idx` itself."""
    if num_fewshot <= 0:
        return []
    others = [i for i in range(n) if i != idx]
    # capped at the n - 1 others (upstream would fail instead; only a tiny max_per_task gets here)
    return random.Random(FEWSHOT_SEED + idx).sample(others, min(num_fewshot, len(others)))


def _shots(blocks) -> str:
    return "".join(f"{context}{delim}{continuation}\n\n" for context, delim, continuation in blocks)


def render_multiple_choice(item: dict, delim: str, fewshot: list[dict]) -> list[str]:
    """One prompt per choice: the shared query, then that choice."""
    head = _shots((ex["query"], delim, ex["choices"][ex["gold"]]) for ex in fewshot)
    return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delim: str, fewshot: list[dict]) -> list[str]:
    """One prompt per context option, all ending in the same continuation."""
    head = _shots((ex["context_options"][ex["gold"]], delim, ex["continuation"]) for ex in fewshot)
    return [f"{head}{option}{delim}{item['continuation']}" for option in item["context_options"]]


def render_language_modeling(item: dict, delim: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation (stripped, so it tokenizes as a clean prefix), prompt with it].
    Contexts are trimmed: some datasets carry trailing whitespace."""
    head = _shots((ex["context"].strip(), delim, ex["continuation"]) for ex in fewshot)
    without = f"{head}{item['context'].strip()}{delim}"
    return [without.strip(), without + item["continuation"]]


RENDERERS = {"multiple_choice": render_multiple_choice, "schema": render_schema,
             "language_modeling": render_language_modeling}


# ---------------------------------------------------------------------------------------------------------
# token spans: which positions of each candidate sequence are scored ([start, end) of the tokens)


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) all sequences share."""
    shortest = min(len(s) for s in seqs)
    for i in range(shortest):
        pos = -1 - i if from_end else i
        if any(s[pos] != seqs[0][pos] for s in seqs):
            return i
    return shortest


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    return tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())


def candidate_spans(tokenizer, task_type: str, prompts: list[str]):
    """(token sequences, starts, ends): the scored continuation of sequence i is tokens[i][starts[i]:ends[i]]."""
    tokens = _encode(tokenizer, prompts)
    if task_type == "multiple_choice":  # shared context: the answer starts where the sequences diverge
        start = common_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":  # shared continuation: the common suffix
        suffix = common_length(tokens, from_end=True)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    if task_type == "language_modeling":  # one sequence, scored after the prompt without the continuation
        without, with_ = tokens
        if not (len(without) < len(with_) and with_[:len(without)] == without):
            raise ValueError("language_modeling: the prompt without its continuation does not tokenize "
                             "as a prefix of the prompt with it")
        return [with_], [len(without)], [len(with_)]
    raise ValueError(f"unsupported task type {task_type!r}")


def crop_to(tokens, starts, ends, max_len: int | None):
    """Keep the last `max_len` tokens of longer sequences (models with a hard context limit)."""
    if not max_len:
        return tokens, starts, ends
    out = ([], [], [])
    for t, s, e in zip(tokens, starts, ends):
        cut = max(0, len(t) - max_len)
        if s - cut < 1:
            raise ValueError(f"a continuation of {e - s} tokens does not fit a context of {max_len}")
        for lst, v in zip(out, (t[cut:], s - cut, e - cut)):
            lst.append(v)
    return out


# ---------------------------------------------------------------------------------------------------------
# scoring


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor):
    """(B, T) input -> (losses, predictions), both (B, T): position t scores / predicts token t+1; the last
    column's loss is nan (nothing follows it)."""
    logits = model(input_ids).float()
    B, T, V = logits.shape
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), reduction="none").view(B, T)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


@torch.no_grad()
def evaluate_example(model, tokenizer, data: list[dict], idx: int, task: dict, device) -> bool:
    task_type = task["task_type"]
    fewshot = [data[i] for i in fewshot_indices(idx, len(data), task["num_fewshot"])]
    prompts = RENDERERS[task_type](data[idx], task["continuation_delimiter"], fewshot)
    tokens, starts, ends = candidate_spans(tokenizer, task_type, prompts)
    tokens, starts, ends = crop_to(tokens, starts, ends, getattr(model, "max_seq_len", None))

    pad = tokenizer.get_bos_token_id()  # padding on the right is never scored
    input_ids = torch.full((len(tokens), max(len(t) for t in tokens)), pad, dtype=torch.long)
    for row, t in enumerate(tokens):
        input_ids[row, :len(t)] = torch.tensor(t, dtype=torch.long)
    input_ids = input_ids.to(device)
    losses, predictions = token_losses(model, input_ids)

    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(predictions[0, s - 1:e - 1], input_ids[0, s:e]))
    mean_losses = [losses[row, s - 1:e - 1].mean().item() for row, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == data[idx]["gold"]


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def evaluate_task(model, tokenizer, data: list[dict], task: dict, device, should_stop=None,
                  progress_label: str | None = None) -> float | None:
    """Accuracy over `data`, examples split over the ranks; None when `should_stop` fired on any rank.
    `progress_label`: the label of a progress bar over the examples (None: none).

    Every rank runs the same number of rounds (one example each, or none past the end), asking `should_stop`
    (which may be a collective) once per round, and then does one all-reduce (the correct flags plus a stop flag):
    the ranks' collectives always pair up, whatever the number of examples."""
    rank, world = _dist_info()
    counts = torch.zeros(len(data) + 1, dtype=torch.float32, device=device)  # [correct per example..., stop]
    with Progress(len(data), progress_label or "", unit="example", enabled=progress_label is not None) as bar:
        for first in range(0, len(data), world):
            if should_stop is not None and should_stop():
                counts[-1] = 1.0
                break
            if first + rank < len(data):
                counts[first + rank] = float(evaluate_example(model, tokenizer, data, first + rank, task, device))
            bar.update(min(len(data), first + world))  # this round's examples, on every rank
    if world > 1:
        counts = _all_reduce_sum(counts)
    if counts[-1].item() > 0:
        return None
    return counts[:-1].mean().item() if data else 0.0


def centered(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1 (baseline: a fraction in [0, 1))."""
    return (accuracy - baseline) / (1.0 - baseline)


def bundle_staged(bundle_dir=None) -> bool:
    """Whether the bundle's index files are there; under torch.distributed, agreed by every rank (a bundle staged
    on one node's disk only must not send some ranks into CORE's collectives and the others past them)."""
    from nanochat.distributed import agree

    bundle = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    return not agree(not all(path.is_file() for path in _index_files(bundle)))[0]


def _index_files(bundle: Path) -> tuple[Path, Path]:
    """The two files that say what a bundle holds: its task list and their random baselines."""
    return bundle / "core.yaml", bundle / "eval_meta_data.csv"


def subsample_label(max_per_task: int) -> str | None:
    """What a CORE over a subsample says of itself: the leaderboard's figure uses every example."""
    return f"at most {max_per_task} examples per task, not the leaderboard's all" if max_per_task > 0 else None


def evaluate_core(model, tokenizer, device, bundle_dir=None, max_per_task: int = -1, should_stop=None,
                  log=None, progress_label: str | None = None) -> dict | None:
    """Evaluate `model` (called as model(idx) -> logits (B, T, V)) on every task of the bundle.

    Returns {"core_metric": float, "results": {label: accuracy}, "centered_results": {label: centered}}, or
    None if `should_stop()` (polled between examples) returned True: nothing partial is returned, and the
    caller handles the stop (e.g. saves nothing and requeues). Under torch.distributed all ranks must call
    this together; they return the same result. `log`, if given, gets one line per task. `progress_label`: a label;
    each task's examples then get a progress bar, labelled with it and the task's name."""
    tasks = load_bundle(bundle_dir)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    results, centered_results = {}, {}
    try:
        for task in tasks:
            data = load_task_data(task, max_per_task)
            accuracy = evaluate_task(model, tokenizer, data, task, device, should_stop,
                                     f"{progress_label} {task['label']}" if progress_label else None)
            if accuracy is None:
                return None
            results[task["label"]] = accuracy
            centered_results[task["label"]] = centered(accuracy, task["baseline"])
            if log is not None:
                log(f"{task['label']}: accuracy {accuracy:.4f} | centered {centered_results[task['label']]:.4f} "
                    f"({len(data)} examples, {task['num_fewshot']}-shot {task['task_type']})")
    finally:
        if was_training:
            model.train()
    core = sum(centered_results.values()) / len(centered_results)
    return {"core_metric": core, "results": results, "centered_results": centered_results}
