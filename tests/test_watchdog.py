"""A frozen rank (SIGSTOP) does not hold the others forever: past the step timeout they exit with the watchdog's
code (77, which the batch step of a Slurm job requeues), and the rerun finishes with the uninterrupted weights."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nanochat.preemption import EXIT_HUNG
from nanochat.watchdog import Watchdog
from test_base_train import base  # noqa: F401  (the shared tokenizer fixture)
from test_resume import command, env, results


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the local rank `rank` that the launcher `parent` spawned (RANK in its environment)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_rank_frozen_in_its_checkpoint_write_ends_the_world_within_the_step_timeout_and_the_rerun_matches(
        base):  # noqa: F811
    """Rank 1 is frozen (SIGSTOP) while it writes a checkpoint, the hardest place: rank 0 has written its own files
    under the start-up timeout and waits for rank 1's, which must be the step timeout again."""
    extra = ["nproc=2", "device_batch_size=4", "step_timeout_s=6", "save_every=2"]
    straight = subprocess.run(command(base, "frozen-straight") + extra, env=env(base), capture_output=True)
    assert straight.returncode == 0, straight.stderr
    pause = env(base, NANOCHAT_TEST_CKPT_PAUSE_S="2")  # each rank lingers in its write after its manifest
    proc = subprocess.Popen(command(base, "frozen") + extra, env=pause, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    checkpoints = base / "runs" / "frozen" / "base_train" / "checkpoints"
    while not list(checkpoints.glob(".step_000006.tmp/manifest_rank1.json")) and proc.poll() is None:
        time.sleep(0.05)
    pid = rank_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    frozen = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    waited = time.monotonic() - frozen
    assert proc.returncode == EXIT_HUNG, stderr
    assert "rank 0: no progress for 6 s (step timeout)" in stderr and "Traceback" not in stderr
    assert waited < 2 + 6 + 10, f"the world ended {waited:.1f} s after the freeze"
    print(f"\nrank frozen in its checkpoint write -> world ended in {waited:.1f} s (step timeout 6 s)")
    again = subprocess.run(command(base, "frozen") + extra, env=env(base), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    summary, rows = results(base, "frozen")
    assert summary["weights_sha256"] == results(base, "frozen-straight")[0]["weights_sha256"]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))


def test_a_checkpoint_write_gets_the_start_up_timeout_and_the_next_step_the_step_timeout():
    """A rank writing its checkpoint files to a slow shared filesystem makes progress: the start-up timeout, until
    its next beat. After stop() a beat watches nothing."""
    dog = Watchdog()
    dog._timeouts = (1800.0, 600.0)  # as start() sets them, without the watching thread
    dog.beat(step_done=True)
    assert dog._deadline == pytest.approx(time.monotonic() + 600, abs=5)
    dog.beat(slow="writing checkpoint step 10")
    assert dog._deadline == pytest.approx(time.monotonic() + 1800, abs=5) and "checkpoint step 10" in dog._phase
    dog.beat()
    assert dog._deadline == pytest.approx(time.monotonic() + 600, abs=5) and dog._phase == "step timeout"
    dog.stop()
    dog.beat(slow="writing checkpoint step 20")
    assert dog._deadline is None
