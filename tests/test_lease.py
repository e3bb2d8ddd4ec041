"""One writer per run folder (nanochat/lease.py): a second launch on a run in use refuses in one line naming the
holder; a dead holder's lease (dead pid, a Slurm job no longer queued, an old heartbeat) is taken over with a line
that says so; the same Slurm job takes its own lease back; run names are plain names. Real launcher processes."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from test_base_train import base  # noqa: F401  (the shared tokenizer fixture)
from test_launch import launch
from test_resume import command as resume_command, env, last_step, results


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lease(run_dir, *, pid, job_id=None, heartbeat_age=0.0, host=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    host = host or socket.gethostname()
    now = time.time()
    lease = {"owner": f"job {job_id}" if job_id else f"{host}:{pid}", "job_id": job_id, "host": host, "pid": pid,
             "pid_start": None, "token": "old", "acquired": now - heartbeat_age, "heartbeat": now - heartbeat_age,
             "argv": []}
    (run_dir / "lease.json").write_text(json.dumps(lease))


@pytest.fixture
def fake_squeue(tmp_path):
    """A squeue on PATH that prints the `queue` file (empty: no such job), or fails when `fail` exists."""
    folder = tmp_path / "fake_slurm"
    folder.mkdir()
    (folder / "squeue").write_text(f'#!/bin/bash\n[ -e {folder}/fail ] && exit 1\ncat {folder}/queue 2>/dev/null\n')
    (folder / "squeue").chmod(stat.S_IRWXU)
    return folder


def quick(tmp_path, *extra, fake=None, **extra_env):
    """A launch that writes only config.yaml and report.md (stages=[]), still under the run's lease."""
    path = {"PATH": f"{fake}:{os.environ['PATH']}"} if fake else {}
    return launch("stages=[]", "run_name=r", *extra, env_base=tmp_path, **path, **extra_env)


def one_line(result) -> str:
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_a_dead_local_holder_is_taken_over_and_the_lease_released(tmp_path):
    run = tmp_path / "runs" / "r"
    pid = dead_pid()
    write_lease(run, pid=pid)
    result = quick(tmp_path)
    assert result.returncode == 0, result.stderr
    assert one_line(result).startswith(f"lease: taking over run r from {socket.gethostname()}:{pid}: process {pid} "
                                       f"is dead")
    assert (run / "report.md").is_file() and not (run / "lease.json").exists()  # released at the end


@pytest.mark.parametrize("queue, heartbeat_age, fail, reason", [
    ("", 0, False, "job 4242 is no longer queued or running"),  # squeue answers: not there
    ("4242|COMPLETED\n", 0, False, "job 4242 is no longer queued or running"),
    ("4242|RUNNING\n", 3600, True, "its last heartbeat is 60 min old"),  # whatever squeue says
])
def test_a_gone_slurm_holder_is_taken_over(tmp_path, fake_squeue, queue, heartbeat_age, fail, reason):
    (fake_squeue / "queue").write_text(queue)
    if fail:
        (fake_squeue / "fail").touch()
    write_lease(tmp_path / "runs" / "r", pid=os.getpid(), job_id="4242", heartbeat_age=heartbeat_age)
    result = quick(tmp_path, fake=fake_squeue)
    assert result.returncode == 0, result.stderr
    assert one_line(result).startswith(f"lease: taking over run r from job 4242: {reason}")


def test_a_live_holder_refuses_in_one_line(tmp_path, fake_squeue):
    run = tmp_path / "runs" / "r"
    write_lease(run, pid=os.getpid())  # this test process: alive, on this host
    refused = quick(tmp_path)
    assert refused.returncode == 2 and one_line(refused).startswith("error: run r is in use by process ")
    assert f"kill {os.getpid()}" in refused.stderr and not (run / "config.yaml").exists()

    (fake_squeue / "queue").write_text("4242|PENDING\n")  # a requeued job waits in the queue
    write_lease(run, pid=dead_pid(), job_id="4242")
    refused = quick(tmp_path, fake=fake_squeue)
    assert refused.returncode == 2 and "in use by Slurm job 4242" in one_line(refused)
    assert refused.stderr.rstrip().endswith("stop it: scancel 4242")

    (fake_squeue / "fail").touch()  # squeue cannot tell: the holder counts as alive
    assert quick(tmp_path, fake=fake_squeue).returncode == 2
    assert json.loads((run / "lease.json").read_text())["token"] == "old" and not (run / "config.yaml").exists()


def test_the_same_slurm_job_takes_its_own_lease_back(tmp_path, fake_squeue):
    """After a requeue or a node failure the job's old process is gone: its lease is its own, without a word.
    Another live process of the same job on this host (two launches in one salloc shell) still refuses."""
    (fake_squeue / "queue").write_text("4242|RUNNING\n")
    run = tmp_path / "runs" / "r"
    write_lease(run, pid=dead_pid(), job_id="4242")
    result = quick(tmp_path, fake=fake_squeue, SLURM_JOB_ID="4242")
    assert result.returncode == 0 and result.stderr == "" and not (run / "lease.json").exists()

    write_lease(run, pid=os.getpid(), job_id="4242")
    refused = quick(tmp_path, fake=fake_squeue, SLURM_JOB_ID="4242")
    assert refused.returncode == 2 and "in use by Slurm job 4242" in one_line(refused)
    # an array element's owner is ARRAYJOB_TASK, not the array: another element is another owner
    write_lease(run, pid=dead_pid(), job_id="77_1")
    (fake_squeue / "queue").write_text("77_1|RUNNING\n77_2|RUNNING\n")
    refused = quick(tmp_path, fake=fake_squeue, SLURM_JOB_ID="79", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="2")
    assert refused.returncode == 2 and "in use by Slurm job 77_1" in one_line(refused)
    taken = quick(tmp_path, fake=fake_squeue, SLURM_JOB_ID="78", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="1")
    assert taken.returncode == 0 and taken.stderr == ""


@pytest.mark.parametrize("name, sweep", [("../x", False), ("a/b", False), (".hidden", False), ("", False),
                                         ("x/../../y", False), ("../x", True)])
def test_run_and_sweep_names_are_plain_names(tmp_path, name, sweep):
    inner = tmp_path / "deep" / "base"
    inner.mkdir(parents=True)
    extra = ["+experiment=isoflop", "depths=[2]", "flops_budgets=[1e11]", "num_iterations=-1"] if sweep else []
    result = launch(f"run_name={name}", "stages=[]", *extra, env_base=inner)
    assert result.returncode == 2 and one_line(result).startswith(f"error: run_name={name!r} is not a plain name")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written, inside or outside


def command(base, name):
    """test_resume's run in 30 steps: the first launch still trains when the second one has been refused."""
    return resume_command(base, name) + ["num_iterations=30", "eval_every=10"]


@pytest.mark.slow
def test_a_second_launch_refuses_while_the_first_trains_and_a_sigkilled_holder_is_taken_over(base):  # noqa: F811
    subprocess.run(command(base, "straight"), env=env(base), check=True, capture_output=True)
    expected_summary, expected_rows = results(base, "straight")

    first = subprocess.Popen(command(base, "twice"), env=env(base), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 300
    while last_step(base, "twice") < 1 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first launch must still be training"
    started = time.time()
    second = subprocess.run(command(base, "twice"), env=env(base), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and second.stdout == "", second.stdout
    assert one_line(second) == (f"error: run twice is in use by process {first.pid} on this host "
                                f"({socket.gethostname()}) (its lease {base / 'runs' / 'twice' / 'lease.json'}, "
                                f"heartbeat {second.stderr.split('heartbeat ')[1].split(' s ago')[0]} s ago); wait "
                                f"for it to end, or stop it: kill {first.pid}\n")
    assert first.poll() is None, f"the refusal took {time.time() - started:.0f}s; the first run must still be going"
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    summary, rows = results(base, "twice")
    assert summary["weights_sha256"] == expected_summary["weights_sha256"]
    assert rows == expected_rows  # nothing logged twice, nothing missing

    # SIGKILL leaves the lease behind; the next launch takes it over (dead pid) and ends at the same weights
    killed = subprocess.Popen(command(base, "killed"), env=env(base), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    while last_step(base, "killed") < 3 and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    lease = json.loads((base / "runs" / "killed" / "lease.json").read_text())
    assert lease["pid"] == killed.pid and lease["job_id"] is None
    finish = subprocess.run(command(base, "killed"), env=env(base), capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert (f"lease: taking over run killed from {socket.gethostname()}:{killed.pid}: process {killed.pid} is dead"
            in finish.stderr)
    summary, rows = results(base, "killed")
    assert summary["weights_sha256"] == expected_summary["weights_sha256"] and rows == expected_rows
    assert not (base / "runs" / "killed" / "lease.json").exists()


def test_a_holder_learns_that_its_lease_was_taken_over(tmp_path, capfd):
    from nanochat import lease

    path = tmp_path / "run" / "lease.json"
    path.parent.mkdir()
    with lease.Lease(path, "run", heartbeat_s=0.05) as held:
        assert lease.lost() is None
        path.write_text(json.dumps({**held.record, "token": "someone-else", "owner": "job 99"}))
        deadline = time.time() + 10
        while lease.lost() is None and time.time() < deadline:
            time.sleep(0.05)
        assert lease.lost() == "run"  # what the training loop agrees on before its next save
    assert "taken over by job 99" in capfd.readouterr().err
    assert json.loads(path.read_text())["token"] == "someone-else"  # the new holder's lease is left alone
    assert lease.lost() is None
