"""The steps a training stage runs between two logged steps (`log_every`). Their losses stay on the device, summed,
so that the host waits for the device only when the window closes: one all-reduce and one `.item()` for all of its
steps, and one time measurement (on a GPU a step's time is only known after a sync). On a CPU nothing runs ahead
of the host, so the window is one step and every step is logged."""

import contextlib
import time
from typing import NamedTuple

import torch

from nanochat.distributed import mean_across_ranks


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log_every(requested: int, device) -> int:
    """`requested`, else (0) every step on a CPU and every 10th on a GPU."""
    return requested or (10 if device.type == "cuda" else 1)


class Closed(NamedTuple):
    loss: float  # the mean over the steps and ranks
    last_loss: float  # the last step's, over the ranks: what a run reports as its loss, wherever its saves fell
    seconds: float
    steps: int
    tokens: int
    row: dict  # the steps' own figures (StepResult.row), averaged
    text: str | None  # the last step's progress text


class LogWindow:
    def __init__(self, device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        """Time from here, once the device has caught up with the steps before."""
        synchronize(self.device)
        self.start = time.time()
        self.steps, self.tokens, self.loss, self.last, self.rows, self.text = 0, 0, 0.0, 0.0, [], None

    @contextlib.contextmanager
    def paused(self, pausing: bool = True):
        """The time inside does not count (once the device has finished the window's steps so far)."""
        if not pausing:
            yield
            return
        synchronize(self.device)
        paused = time.time()
        try:
            yield
        finally:
            synchronize(self.device)
            self.start += time.time() - paused

    def add(self, loss: "torch.Tensor | float", tokens: int, row: dict, text: str | None) -> None:
        """One step: `loss` as StepResult has it (a tensor: this rank's, detached; a float: already global)."""
        self.steps += 1
        self.tokens += tokens
        self.loss, self.last = self.loss + loss, loss
        self.rows.append(row)
        self.text = text

    def close(self) -> Closed:
        """The window's figures (restart() begins the next)."""
        losses = [self.loss / self.steps, self.last]
        if torch.is_tensor(self.last):  # both in one all-reduce
            losses = mean_across_ranks(torch.stack(losses)).tolist()
        synchronize(self.device)
        row = {key: sum(r[key] for r in self.rows) / self.steps for key in self.rows[-1]}
        return Closed(*losses, time.time() - self.start, self.steps, self.tokens, row, self.text)
