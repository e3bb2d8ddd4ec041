"""The progress of every long loop (training steps, evaluation items, bytes downloaded, text fed to the tokenizer
trainer), shown one way.

On a terminal: a tqdm bar, redrawn in place; tqdm pads over what a longer earlier draw left and trims the line to
the terminal's width, so no residue stays behind. Otherwise (a Slurm log, a pipe): a plain line every `every` units
or every `every_s` seconds, whichever comes first, and the last one, so a log stays readable and greppable.

Rate and ETA count only what this process did after its first update: a resumed run's earlier steps happened in
another process, and a process's first update carries its start-up (compilation, warm-up, the first response),
which would inflate the ETA. Until a second update there is no rate, and no ETA is shown.

Everything goes to stdout, the output log of a Slurm job (submitit keeps stderr for errors). Only rank 0 shows.
"""

import os
import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

from nanochat.common import get_dist_info

DRAW_INTERVAL_S = 0.1  # a terminal bar is redrawn at most this often (tqdm's own default)


class Progress:
    """`total` may be None (unknown) and may be reassigned as it becomes known (downloads). `scale` shows
    amounts in a larger unit, e.g. (1e6, "MB"); without it they are whole `unit`s."""

    def __init__(self, total: float | None, label: str, *, unit: str = "it", scale: tuple[float, str] | None = None,
                 every: int = 0, every_s: float = 30.0, enabled: bool = True, stream=None,
                 clock=time.monotonic):
        self.total, self.label, self.unit, self.scale = total, label, unit, scale
        self.every, self.every_s, self.clock = every, every_s, clock
        self.enabled = enabled and get_dist_info()[0] == 0
        self.stream = stream or sys.stdout
        self.tty = self.enabled and _sized_terminal(self.stream)
        self.position, self.text, self.closed = 0, "", False
        self._first = None  # (time, position) of this process's first update: the rate counts from there
        self._updated = None  # time of the latest update
        self._shown = (clock(), None)  # time and position of the latest line or draw
        self._next_line_at = every  # the position at which `every` asks for the next plain line
        self._bar = None  # the tqdm bar, made at the first draw so that earlier prints come before it
        self._lock = threading.RLock()  # downloads advance from several threads

    # -- what callers do -------------------------------------------------------------------------------------
    def update(self, position: float, text: str | None = None) -> None:
        """Progress is at `position`; `text` (when given) replaces the stage's own figures in the line."""
        if not self.enabled or self.closed:
            return
        with self._lock:
            now = self.clock()
            self.position, self._updated = position, now
            if text is not None:
                self.text = text
            if self._first is None:
                self._first = (now, position)
            if self.tty:
                if now - self._shown[0] >= DRAW_INTERVAL_S or self._finished() or self._bar is None:
                    self._draw(now)
            elif self._line_due(now):
                self._print_line(now)

    def advance(self, amount: float = 1, text: str | None = None) -> None:
        with self._lock:
            self.update(self.position + amount, text)

    @contextmanager
    def aside(self):
        """Print something else meanwhile: on a terminal the bar is cleared first and redrawn after."""
        if self._bar is None:
            yield
            return
        with self._lock, tqdm.external_write_mode(file=self.stream):
            yield

    def close(self) -> None:
        """The last state: a stopped loop's last line too, not only a finished one's."""
        if not self.enabled or self.closed:
            return
        with self._lock:
            self.closed = True
            if self._bar is not None:
                self._draw(self.clock(), closing=True)
                self._bar.close()
                self._bar = None
            elif self._first is not None and self._shown[1] != self.position:
                self._print_line(self.clock())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what is shown ---------------------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Units a second over this process's updates after its first; None before a second update."""
        if self._first is None:
            return None
        start, origin = self._first
        if self.position == origin or self._updated <= start:
            return None
        return (self.position - origin) / (self._updated - start)

    def eta_s(self) -> float | None:
        rate = self.rate()
        if not rate or self.total is None:
            return None
        return max(0.0, self.total - self.position) / rate

    def line(self) -> str:
        """The plain line: label, amounts and percentage, then the details."""
        # capped: a total can be a limit that the last unit crosses (the tokenizer's max_chars, mid-document)
        percent = f" ({min(100.0, 100 * self.position / self.total):.1f}%)" if self.total else ""
        return f"{self.label} {self._amounts()}{percent}{self._details()}"

    def _amounts(self) -> str:
        if self.scale is not None:
            size, name = self.scale
            total = f"/{self.total / size:.1f}" if self.total is not None else ""
            return f"{self.position / size:.1f}{total} {name}"
        if self.total is None:
            return f"{self.position:g}"
        return f"{int(self.position):0{len(str(int(self.total)))}d}/{int(self.total)}"

    def _details(self) -> str:
        """Rate and ETA, then the caller's text: first, as a narrow terminal trims the bar's line at the right."""
        rate, eta = self.rate(), self.eta_s()
        parts = [self._rate_text(rate)] if rate else []
        if eta is not None and not self._finished() and not self.closed:  # closed: nothing more to wait for
            parts.append(f"eta {duration(eta)}")
        if self.text:
            parts.append(self.text)
        return "".join(f" | {part}" for part in parts)

    def _rate_text(self, rate: float) -> str:
        if self.scale is not None:
            size, name = self.scale
            return f"{rate / size:.1f} {name}/s"
        # slow steps read better as seconds per unit than as a fraction of a unit per second
        return f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}"

    def _finished(self) -> bool:
        return self.total is not None and self.position >= self.total

    # -- plain lines -----------------------------------------------------------------------------------------
    def _line_due(self, now: float) -> bool:
        if self._finished():
            return self._shown[1] != self.position  # the last line, once
        return (self.every > 0 and self.position >= self._next_line_at) or now - self._shown[0] >= self.every_s

    def _print_line(self, now: float) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._shown = (now, self.position)
        if self.every > 0:
            self._next_line_at = (self.position // self.every + 1) * self.every

    # -- the terminal bar ------------------------------------------------------------------------------------
    def _draw(self, now: float, closing: bool = False) -> None:
        layout = "{desc} {percentage:3.0f}%|{bar}| {status}" if self.total else "{desc} {status}"
        status = self._amounts() + self._details()
        filled = min(self.position, self.total) if self.total else self.position  # capped, as the percentage
        if self._bar is None:  # it draws as it is made
            self._bar = _Bar(status, total=self.total, initial=filled, desc=self.label, bar_format=layout,
                             file=self.stream, dynamic_ncols=True)
        else:
            bar = self._bar
            bar.total, bar.n, bar.bar_format, bar.status = self.total, filled, layout, status
            if not closing:  # closing, tqdm draws the last state itself
                bar.refresh()
        self._shown = (now, self.position)


class _Bar(tqdm):
    """A tqdm bar whose right-hand side is our own text (`status`), so the terminal shows the same rate and ETA
    as the plain lines."""

    def __init__(self, status: str, **kwargs):
        self.status = status  # before tqdm's constructor, which draws once
        super().__init__(**kwargs)

    @property
    def format_dict(self):
        return {**super().format_dict, "status": self.status}


def _sized_terminal(stream) -> bool:
    """A terminal that knows its size. One without (0 columns or lines: a pty nobody sized, as `script` makes
    without a terminal) would have tqdm draw nothing at all; it gets the plain lines."""
    if not stream.isatty():
        return False
    try:
        return min(os.get_terminal_size(stream.fileno())) > 0
    except OSError:  # no file descriptor to ask (io.UnsupportedOperation): tqdm draws untrimmed
        return True


def duration(seconds: float) -> str:
    """45s, 3m20s, 2h05m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
