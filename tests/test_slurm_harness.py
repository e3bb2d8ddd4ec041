"""The harness on the real local Slurm cluster (slurm/dev/up.sh): submission, 2-node training, requeue at the
time limit, and no requeue for a crash or a user's scancel (USR2 and the other faults: test_slurm_faults.py).
Run with the cluster up: pytest -m slurm."""

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
import weakref

import pytest

from slurm_fixtures import job_field, sh, slurm_cluster, wait_for, wait_state  # noqa: F401 (fixture)
from test_base_train import TINY, base  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm
LONG = ["depth=2", "eval_every=-1", "sample_every=-1", "save_every_minutes=0"]


def submission(base, name, *overrides, tokenizer=True, **extra_env) -> subprocess.CompletedProcess:
    """`python -m experiments.launch +cluster=localslurm ...` from a shell with `extra_env`."""
    args = [f"run_name={name}", *overrides]
    if tokenizer:
        args.append(f"tokenizer={base / 'runs' / 'shared' / 'tok_train' / 'tokenizer'}")
    return subprocess.run([sys.executable, "-m", "experiments.launch", "+cluster=localslurm", *args],
                          capture_output=True, text=True,
                          env={**os.environ, "NANOCHAT_BASE_DIR": str(base), **extra_env}, timeout=120)


def submit(base, name, *overrides, tokenizer=True, **extra_env):
    """A submission that succeeds; the id from its first line."""
    result = submission(base, name, *overrides, tokenizer=tokenizer, **extra_env)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("Submitted job "), result.stdout
    return int(first.split()[-1]), result.stdout


def local_started(base, name, *overrides, **extra_env):
    """The same run on this machine, without Slurm, started now in the background (a reference trains while a
    Slurm test waits on the scheduler and its faults), from a shell with `extra_env`: a function that waits for it
    and returns (summary, metric rows). One thread, as the localslurm profile sets: the thread count changes float
    summation order, and so the weights' last bits."""
    tokenizer = base / "runs" / "shared" / "tok_train" / "tokenizer"
    errors = base / f"{name}.stderr"  # a file, not a pipe that nobody reads while the run fills it
    with open(errors, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.launch", f"run_name={name}",
                                 f"tokenizer={tokenizer}", *overrides], stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", **extra_env},
                                start_new_session=True)

    def stop():  # the launcher and its ranks, when nobody waits for them: not left to compete for the CPUs
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    @functools.cache
    def result():
        try:
            assert proc.wait(timeout=600) == 0, errors.read_text()
        finally:
            stop()
        rows = [json.loads(line) for line in (stage_dir(base, name) / "metrics.jsonl").read_text().splitlines()]
        return json.loads((stage_dir(base, name) / "summary.json").read_text()), rows
    weakref.finalize(result, stop)  # a test that failed before it waited
    return result


def stage_dir(base, name):
    return base / "runs" / name / "base_train"


def summary(base, name, timeout=240):
    path = stage_dir(base, name) / "summary.json"
    wait_for(path.is_file, timeout, f"{path}")
    return json.loads(path.read_text())


def logged_step(base, name) -> int:
    path = stage_dir(base, name) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return max([r["step"] for r in rows if "loss" in r], default=-1)


def test_a_tiny_pipeline_runs_to_the_end(slurm_cluster, base):  # noqa: F811
    job, stdout = submit(base, "slurm-a", "stages=[tok_train,tok_eval,base_train]", *TINY, tokenizer=False)
    assert "tok_train, tok_eval (1 rank(s))" in stdout and f"after job {job - 1}" in stdout
    result = summary(base, "slurm-a")
    assert result["step"] == 8 and len(result["weights_sha256"]) == 64
    assert wait_state(job - 1, "COMPLETED") and wait_state(job, "COMPLETED")
    assert (base / "runs" / "slurm-a" / "slurm" / f"{job}_0_log.out").is_file()  # logs live in the run folder


def test_two_nodes_follow_the_one_process_loss_curve(slurm_cluster, base):  # noqa: F811
    single = local_started(base, "slurm-b-single", "stages=[base_train]", "data_shards=2", "device_batch_size=4",
                           *TINY)
    job, stdout = submit(base, "slurm-b", "stages=[base_train]", "cluster.nodes=2", "device_batch_size=4", *TINY)
    assert "(2 rank(s))" in stdout
    two = summary(base, "slurm-b")
    assert two["world_size"] == 2
    log = (base / "runs" / "slurm-b" / "slurm" / f"{job}_0_log.out").read_text()
    assert "world: 2 rank(s) on 2 node(s) via slurm, master n1:" in log  # the start logs the world
    _, single_rows = single()
    rows = [json.loads(line) for line in (stage_dir(base, "slurm-b") / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(
        [r["loss"] for r in single_rows if "loss" in r], rel=1e-6)


def test_a_time_limit_requeues_to_completion(slurm_cluster, base):  # noqa: F811
    # 60 steps: more than one 1-minute run can train, however early Slurm signals ("resolution of event
    # handling": up to a minute) and however fast the CPU (20 steps once fitted into a single run and never requeued)
    job, _ = submit(base, "slurm-d", "stages=[base_train]", "num_iterations=60", "cluster.time_min=1",
                    "cluster.signal_lead_s=25", *LONG)
    result = summary(base, "slurm-d", timeout=600)
    assert result["step"] == 60 and result["requeues"] >= 1
    assert wait_state(job, "COMPLETED", timeout=60)


def test_a_crash_is_not_requeued(slurm_cluster, base):  # noqa: F811
    job, _ = submit(base, "slurm-e", "stages=[base_train]", *TINY, "tokenizer=/nonexistent", tokenizer=False)
    assert wait_state(job, "FAILED", timeout=120)
    time.sleep(5)  # a requeue would show up as a restart by now
    assert job_field(job, "Restarts") in (None, "0") and sacct_runs(job) == 1


def test_scancel_is_not_requeued(slurm_cluster, base):  # noqa: F811
    job, _ = submit(base, "slurm-f", "stages=[base_train]", "num_iterations=200", *LONG)
    wait_for(lambda: logged_step(base, "slurm-f") >= 2, 120, "step 2 of slurm-f")
    sh("scancel", str(job))
    assert wait_state(job, "CANCELLED", timeout=60)
    time.sleep(15)  # longer than cred_expire + the scheduler interval: a requeued job would be back
    assert sacct_runs(job) == 1 and not (stage_dir(base, "slurm-f") / "summary.json").exists()


def sacct_runs(job: int) -> int:
    """How many times the job ran (sacct --duplicates lists each run of a requeued job)."""
    return len(sh("sacct", "-n", "-X", "-D", "-P", "-j", str(job), "-o", "JobID").splitlines())


def test_speedrun_script_fails_fast_when_data_is_not_staged(slurm_cluster, tmp_path):  # noqa: F811
    """slurm/speedrun.slurm, resized for the dev cluster from the command line, stops before training with the
    one-line staging hint rather than holding the GPUs."""
    out = tmp_path / "speedrun.out"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "empty"), "NANOCHAT_PYTHON": sys.executable}
    started = time.time()
    result = subprocess.run(["sbatch", "--parsable", "--wait", "-p", "debug", "--ntasks-per-node=1",
                             "--cpus-per-task=1", "--gpus-per-node=0", "--time=5", f"--output={out}",
                             "slurm/speedrun.slurm"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and time.time() - started < 60
    log = out.read_text()
    assert "no climbmix shards" in log and "python -m nanochat.dataset --dataset climbmix -n 170" in log
    assert "base_train" not in log and "Traceback" not in log
