"""The task mixtures each stage trains and evaluates on, from the config; the pipeline builds them with
`stage_tasks` and hands them to the stage (nanochat/ never imports tasks/). `task_data=hub` uses upstream's
datasets (staged by `python -m tasks.stage`); `task_data=fixture` uses the tiny shipped ones plus generated
data, so the embedded pipeline learns the chat format offline. Building reads no rows: a task reads its files on
first use, so building every stage's tasks up front is how a missing dataset fails in one line at once."""

from dataclasses import dataclass, field

from nanochat.common import UserError

from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.common import Task, TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.identity import Identity
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

@dataclass
class StageTasks:
    """What one stage trains or evaluates on."""
    train: Task | None = None
    val: Task | None = None
    quick: dict[str, Task] = field(default_factory=dict)  # checked on while fine-tuning (chat_eval_every)
    suite: dict[str, Task] = field(default_factory=dict)  # a chat_eval stage's tasks, by display name


def stage_tasks(cfg, stage: str, mixed: bool = True) -> StageTasks | None:
    """The tasks of `stage`; None for the stages that read no task (tokenizer, pretraining, base_eval).
    `mixed=False` leaves fine-tuning's mixtures unbuilt (mixing reads every task's length)."""
    if stage in ("mid_train", "sft"):
        parts = [finetune_tasks(cfg, stage, split) for split in ("train", "val")]
        quick = quick_eval_tasks(cfg) if getattr(cfg, stage).chat_eval_every > 0 else {}
        return StageTasks(*(TaskMixture(*p) for p in parts), quick) if mixed else StageTasks(quick=quick)
    if stage == "rl":
        return StageTasks(*rl_tasks(cfg))
    if stage.startswith("chat_eval"):
        return StageTasks(suite=eval_suite(cfg))
    return None


def check_staged(cfg, stages: list[str]) -> None:
    """Build (without reading) every task the given stages will use, so that a missing dataset fails in one line
    before hours of pretraining rather than after."""
    for stage in stages:
        stage_tasks(cfg, stage, mixed=False)


def finetune_tasks(cfg, stage: str, split: str) -> tuple[list[Task], list[float]]:
    """sft's (and mid_train's) conversations and their weights (epochs): general chat, multiple choice, maths with
    the calculator (upstream's HEAD SFT mixture), and the optional identity, spelling and arithmetic rows."""
    source, fcfg = cfg.task_data, getattr(cfg, stage)
    train = split == "train"
    tasks = [SmolTalk(split="train" if train else "test", source=source),
             MMLU(subset="auxiliary_train", split="train", source=source) if train
             else MMLU(subset="all", split="test", source=source, stop=5200),
             GSM8K(split="train" if train else "test", source=source, stop=None if train else 420)]
    weights = [1.0, float(fcfg.mmlu_epochs), float(fcfg.gsm8k_epochs)] if train else [1.0, 1.0, 1.0]
    identity_epochs = fcfg.identity_epochs or (2 if fcfg.identity else 0)
    if train:
        if identity_epochs > 0:
            tasks.append(CustomJSON(fcfg.identity) if fcfg.identity else Identity(split="train"))
            weights.append(float(identity_epochs))
        for size, kind in ((fcfg.simple_spelling, SimpleSpelling), (fcfg.spelling_bee, SpellingBee)):
            if size > 0:
                tasks.append(kind(size=size, split="train", source=source))
                weights.append(1.0)
    if fcfg.arithmetic > 0:
        tasks.append(Arithmetic(size=fcfg.arithmetic if train else max(1, fcfg.arithmetic // 10),
                                split="train" if train else "test"))
        weights.append(1.0)
    return tasks, weights


def quick_eval_tasks(cfg) -> dict[str, Task]:
    """The categorical tasks fine-tuning checks on as it goes: one forward pass per question, so cheap."""
    return {name: _eval_task(name, cfg) for name in ("ARC-Easy", "MMLU")}


def rl_tasks(cfg) -> tuple[Task, Task]:
    """(train, validation) for rl: GSM8K as upstream, or generated arithmetic for a model too small for GSM8K."""
    if cfg.rl.task == "gsm8k":
        source = cfg.task_data
        return GSM8K(split="train", source=source), GSM8K(split="test", source=source)
    if cfg.rl.task == "arithmetic":
        return Arithmetic(size=100_000, split="train"), Arithmetic(size=max(1, cfg.rl.eval_examples), split="test")
    raise ValueError(f"rl.task={cfg.rl.task!r} (a config that skipped experiments.config's checks)")


def _eval_task(name: str, cfg) -> Task:
    source = cfg.task_data
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(subset=name, split="test", source=source)
    if name == "MMLU":
        return MMLU(subset="all", split="test", source=source)
    if name == "GSM8K":
        return GSM8K(split="test", source=source)
    if name == "HumanEval":
        return HumanEval(source=source)
    if name == "SpellingBee":
        return SpellingBee(size=cfg.chat_eval.generated_examples, split="test", source=source)
    if name == "Arithmetic":
        return Arithmetic(size=cfg.chat_eval.generated_examples, split="test")
    raise UserError(f"chat_eval.tasks: unknown task {name!r}; valid: {', '.join(EVAL_TASKS)}")


EVAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "Arithmetic")


def eval_suite(cfg) -> dict[str, Task]:
    """The chat_eval stages' tasks by display name, built (and checked to be staged) before any is run."""
    return {name: _eval_task(name, cfg) for name in cfg.chat_eval.tasks}
