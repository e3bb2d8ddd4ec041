import os
import signal
import subprocess
import time

import pytest

from types import SimpleNamespace

from nanochat.common import UserError
from nanochat.preemption import (ENDS_ENV, EXIT_HUNG, EXIT_REQUEUE, VERDICT_DIR_ENV, Preemption, capped, classify,
                                 count_restarts, exit_code_after)
from nanochat.scheduler import SlurmJob
from test_base_train import base  # noqa: F401  (the shared tokenizer fixture)
from test_resume import command, env, last_step, results


def test_signals_only_set_flags():
    handler = Preemption().install()
    try:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the process with the default handler
        assert handler.requested and handler.term and not handler.usr2
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.usr2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def fake_scontrol(tmp_path, monkeypatch, preempt_time: str | None):
    """A job 77 and, on PATH, an scontrol that shows it with this PreemptTime (None: no scontrol at all)."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if preempt_time is not None:
        script = bin_dir / "scontrol"
        script.write_text(f"#!/bin/sh\necho 'JobId=77 JobName=x JobState=RUNNING PreemptTime={preempt_time} "
                          f"SuspendTime=None'\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


@pytest.mark.parametrize("usr2, in_slurm, preempt_time, reason", [
    (True, True, None, "time_limit"),
    (False, False, None, "cancelled"),  # outside Slurm a TERM is someone stopping the run
    (False, True, "2026-12-06T15:00:00", "preemption"),  # in its grace time the job still shows RUNNING
    (False, True, "None", "cancelled"),  # a user's scancel
    (False, True, None, "sigterm"),  # no scontrol in this container: the batch step decides
])
def test_rank_0_classifies_a_stop(tmp_path, monkeypatch, usr2, in_slurm, preempt_time, reason):
    fake_scontrol(tmp_path, monkeypatch, preempt_time)
    if not in_slurm:
        monkeypatch.delenv("SLURM_JOB_ID")
    assert classify(usr2) == reason


CAPS = SimpleNamespace(max_requeues=50, max_preemptions=50, max_time_limits=50, max_node_failures=2)


@pytest.mark.parametrize("record, restart, ends, counts", [
    (None, 3, None, (0, 0, 0)),  # a fresh start: nothing to count
    ({"job": "76", "restart": 0, "stop": "time_limit"}, 1, None, (0, 0, 0)),  # another job: a resubmission
    ({"job": "77", "restart": 0, "stop": "time_limit"}, 1, None, (0, 1, 0)),
    ({"job": "77", "restart": 2, "stop": "preemption"}, 3, None, (1, 0, 0)),
    ({"job": "77", "restart": 2, "stop": "sigterm"}, 3, None, (1, 0, 0)),  # requeued by the batch step: was preempted
    ({"job": "77", "restart": 0, "stop": None}, 1, None, (0, 0, 1)),  # a periodic save, then the job came back
    ({"job": "77", "restart": 0, "stop": "time_limit"}, 2, None, (0, 1, 1)),  # and died again before saving
    ({"job": "77", "restart": 1, "stop": "time_limit"}, 1, None, (0, 0, 0)),  # the same run resuming (a new stage)
    # Slurm's accounting names the ends the checkpoint could not: a preemption with no grace time to save in, ...
    ({"job": "77", "restart": 0, "stop": None}, 1, "PREEMPTED", (1, 0, 0)),
    ({"job": "77", "restart": 0, "stop": "time_limit"}, 3, "REQUEUED,TIMEOUT,NODE_FAIL", (0, 2, 1)),
    # a hang, then a time limit
    ({"job": "77", "restart": 1, "stop": None}, 3, "PREEMPTED,REQUEUED,TIMEOUT", (0, 1, 1)),
    ({"job": "77", "restart": 0, "stop": None}, 1, "PREEMPTED,TIMEOUT", (0, 0, 1)),  # not one end per run: unused
])
def test_restarts_are_counted_by_kind_on_resume(monkeypatch, record, restart, ends, counts):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
    monkeypatch.setenv(ENDS_ENV, ends) if ends else monkeypatch.delenv(ENDS_ENV, raising=False)
    before = {"requeues": 4, "preemptions": 1, "time_limits": 3, "node_failures": 0}
    after = count_restarts(before, record, CAPS, "base_train")
    added = tuple(after[k] - before[k] for k in ("preemptions", "time_limits", "node_failures"))
    assert added == counts and after["requeues"] - before["requeues"] == sum(counts)


def test_restarts_past_a_cap_stop_for_good(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(UserError, match=r"stopping for good.*3 node failures \(max_node_failures=2\)"):
        count_restarts({"requeues": 0}, {"job": "77", "restart": 0, "stop": None}, CAPS, "base_train")
    assert capped({"requeues": 51}, CAPS) == "51 requeues (max_requeues=50)"
    assert capped({"requeues": 50, "time_limits": 50}, CAPS) is None


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
    assert proc.returncode == EXIT_REQUEUE and "stopped at step" in stderr and "run the same command again" in stderr
    stopped_at = last_step(base, name)
    latest = base / "runs" / name / "base_train" / "checkpoints" / "latest"
    assert latest.read_text().strip() == f"step_{stopped_at:06d}"  # saved exactly where it stopped
    again = subprocess.run(command(base, name) + extra, env=env(base), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    summary, rows = results(base, name)
    assert summary["weights_sha256"] == results(base, f"usr2-straight-{nproc}")[0]["weights_sha256"]
    assert summary["resumes"] == 1 and [r["step"] for r in rows if "loss" in r] == list(range(1, 13))


def test_a_rank_leaving_on_an_exception_leaves_its_verdict(tmp_path, monkeypatch):
    """A lost peer exits 77 (requeue); an error of its own is re-raised (never requeued); both say so in a file
    per rank for the batch step, whose srun exit code would otherwise be a killed peer's 128+signal."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv(VERDICT_DIR_ENV, str(tmp_path))
    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.77.0.12]:31370")
    assert exit_code_after(lost) == EXIT_HUNG
    assert "Connection closed by peer" in (tmp_path / "77.run1.rank2.peer").read_text()
    assert exit_code_after(ValueError("a bug of ours")) is None
    assert (tmp_path / "77.run1.rank2.error").read_text().startswith("ValueError: a bug of ours")
