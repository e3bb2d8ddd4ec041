"""What every task shares: a dataset of conversations with slicing, mixtures of tasks, and the multiple-choice
prompt.

A conversation is a dict {"messages": [{"role": "user"|"assistant", "content": str | [parts]}, ...], ...};
the last message is the reference answer. Categorical tasks add "letters" (the choices' letters) and are scored
by the model's pick among those letters; generative tasks are scored on a sampled completion.
"""

import math
import random

from nanochat.common import UserError


class Task:
    """A view `start:stop:step` over a dataset's examples. Subclasses give `num_examples()` and
    `get_example(i)`; evaluation tasks also set `name`, `eval_type`, `baseline` (random-guess accuracy, for
    centering) and implement `evaluate(conversation, completion) -> bool`."""

    name = "task"
    eval_type = "generative"  # or "categorical"
    baseline = 0.0

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise UserError(f"{type(self).__name__}: bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}[{index}] out of range (len {len(self)})")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} is not an evaluation task")

    def reward(self, conversation: dict, completion: str) -> float:
        """RL's reward: 1 for a correct completion, else 0."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """The tasks' examples shuffled together, deterministically for a given seed. A weight w takes
    round(w * len(task)) examples of a task: below 1 a prefix of it, above 1 it cycles (oversampling)."""

    def __init__(self, tasks: list[Task], weights: list[float] | None = None, seed: int = 42, **slicing):
        super().__init__(**slicing)
        weights = [1.0] * len(tasks) if weights is None else list(weights)
        if len(weights) != len(tasks) or any(w < 0 for w in weights):
            raise UserError(f"TaskMixture: {len(tasks)} tasks need as many non-negative weights, got {weights}")
        self.tasks = tasks
        self.index = [(t, i % len(task)) for t, (task, w) in enumerate(zip(tasks, weights))
                      for i in range(round(w * len(task)) if len(task) else 0)]
        random.Random(seed).shuffle(self.index)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """A multiple-choice prompt in upstream nanochat's format: each choice followed by its letter ("- Paris=A"),
    which lets a small model attend to the letter right after reading the choice."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


LETTERS = "ABCDEFGHIJ"
