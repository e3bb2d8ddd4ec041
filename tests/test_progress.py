"""nanochat.progress driven by a fake clock: the plain lines of a log (after a resume, slow units, a stop), the
terminal bar's redraw, and who shows at all."""

import io

import pytest

from nanochat.progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """What a terminal shows of what was written: a carriage return moves to the start of the line, and what is
    written there overwrites what was shown, character by character (the rest stays)."""

    def isatty(self) -> bool:
        return True

    def screen(self) -> list[str]:
        lines, line, col = [], [], 0
        for ch in self.getvalue():
            if ch == "\n":
                lines.append("".join(line).rstrip())
                line, col = [], 0
            elif ch == "\r":
                col = 0
            else:
                line[col:col + 1] = [ch]
                col += 1
        return lines + ["".join(line).rstrip()]


def test_a_resumed_run_in_a_log_times_only_the_steps_of_this_process():
    """Resumed at step 50 of 100: the first step of the process takes 120 s (compilation), then a step a second.
    The ETA is 1 s a step from the second step on; none is shown before (there is no rate yet), and neither the
    earlier process's steps nor the compilation inflate it."""
    clock, log = Clock(), io.StringIO()
    progress = Progress(100, "base_train step", unit="step", every=10, stream=log, clock=clock)
    clock.now += 120
    progress.update(51, "loss 3.0000")
    for step in range(52, 101):
        clock.now += 1
        progress.update(step, "loss 2.0000")
    progress.close()
    assert log.getvalue().splitlines() == [
        "base_train step 051/100 (51.0%) | loss 3.0000",  # due at once (every 10 from 0); no rate yet: no ETA
        "base_train step 060/100 (60.0%) | 1.00 step/s | eta 40s | loss 2.0000",
        "base_train step 070/100 (70.0%) | 1.00 step/s | eta 30s | loss 2.0000",
        "base_train step 080/100 (80.0%) | 1.00 step/s | eta 20s | loss 2.0000",
        "base_train step 090/100 (90.0%) | 1.00 step/s | eta 10s | loss 2.0000",
        "base_train step 100/100 (100.0%) | 1.00 step/s | loss 2.0000",  # the last, once, closed or not
    ]


def test_slow_units_get_a_line_every_30_seconds_and_a_stop_its_last_line():
    clock, log = Clock(), io.StringIO()
    progress = Progress(10, "chat_eval_sft GSM8K", unit="example", stream=log, clock=clock)
    for example in range(1, 8):
        clock.now += 12
        progress.advance()
    progress.close()  # stopped at example 7 (a preemption): the log says where
    assert log.getvalue().splitlines() == [
        "chat_eval_sft GSM8K 03/10 (30.0%) | 12.00 s/example | eta 1m24s",  # 36 s after the start
        "chat_eval_sft GSM8K 06/10 (60.0%) | 12.00 s/example | eta 48s",  # 36 s after the line before
        "chat_eval_sft GSM8K 07/10 (70.0%) | 12.00 s/example",  # no ETA: it will not go on
    ]


def test_an_amount_whose_total_is_learnt_on_the_way():
    clock, log = Clock(), io.StringIO()
    progress = Progress(None, "download", scale=(1e6, "MB"), every_s=0, stream=log, clock=clock)
    progress.advance(1e6)
    progress.total = 4e6
    clock.now += 1
    progress.advance(2e6)
    assert log.getvalue().splitlines() == ["download 1.0 MB", "download 3.0/4.0 MB (75.0%) | 2.0 MB/s | eta 0s"]


def test_the_terminal_bar_redraws_a_shorter_line_without_residue():
    clock, terminal = Clock(), Terminal()
    progress = Progress(4, "base_train step", unit="step", stream=terminal, clock=clock)
    for step, text in enumerate(["loss 10.0000 | 123,456 tok/s | a long tail of figures", "loss 9.0000"], 1):
        clock.now += 1
        progress.update(step, text)
    [line] = terminal.screen()
    assert line.startswith("base_train step  50%|") and line.endswith("| 2/4 | 1.00 step/s | eta 2s | loss 9.0000")
    with progress.aside():  # another line (an evaluation's result) goes above the bar
        print("base_train step 00002 | val_bpb 1.2345", file=terminal)
    clock.now += 2
    progress.update(4, "loss 8.0000")
    progress.close()
    above, bar, end = terminal.screen()
    assert above == "base_train step 00002 | val_bpb 1.2345" and end == ""
    assert bar.startswith("base_train step 100%|") and bar.endswith("| 4/4 | 1.00 step/s | loss 8.0000")


def test_only_rank_zero_shows(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = io.StringIO()
    with Progress(2, "step", stream=log) as progress:
        progress.update(2, "loss 1.0")
    assert log.getvalue() == ""


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (45, "45s"), (200, "3m20s"), (7500, "2h05m")])
def test_duration(seconds, text):
    assert duration(seconds) == text
