import os
import signal
import subprocess
import time

import pytest

from nanochat.preemption import Preemption
from nanochat.scheduler import SlurmJob
from test_base_train import base  # noqa: F401  (the shared tokenizer fixture)
from test_resume import command, env, last_step, results


def test_signals_only_set_flags(monkeypatch):
    handler = Preemption().install()
    try:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the process with the default handler
        assert handler.requested and handler.term
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        assert not handler.should_requeue()  # a plain TERM (scancel, shutdown) is not a preemption
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.should_requeue()  # the time-limit/preemption notice is
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_requeue_targets_the_array_element(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1005")
    assert SlurmJob.from_env().requeue_id == "1005"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1000")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert SlurmJob.from_env().requeue_id == "1000_5"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_usr2_saves_at_the_next_step_and_the_rerun_finishes_identically(base, nproc):  # noqa: F811
    extra = [f"nproc={nproc}", "device_batch_size=4"]
    straight = subprocess.run(command(base, f"usr2-straight-{nproc}") + extra, env=env(base), capture_output=True)
    assert straight.returncode == 0, straight.stderr
    name = f"usr2-{nproc}"
    proc = subprocess.Popen(command(base, name) + extra, env=env(base), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while last_step(base, name) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)  # the launcher forwards it to its ranks, as srun would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "stopped at step" in stderr and "run the same command again" in stderr
    stopped_at = last_step(base, name)
    latest = base / "runs" / name / "base_train" / "checkpoints" / "latest"
    assert latest.read_text().strip() == f"step_{stopped_at:06d}"  # saved exactly where it stopped
    again = subprocess.run(command(base, name) + extra, env=env(base), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    summary, rows = results(base, name)
    assert summary["weights_sha256"] == results(base, f"usr2-straight-{nproc}")[0]["weights_sha256"]
    assert summary["resumes"] == 1 and [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
