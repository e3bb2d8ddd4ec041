import json
import os
import socket
import subprocess
import sys
import time

from nanochat.runs import Run


def test_status_shows_done_and_running_stages(tmp_path):
    run = Run(tmp_path / "runs" / "r1")
    run.root.mkdir(parents=True)
    run.config_path.write_text("depth: 4\nnum_iterations: 100\n")
    run.write_summary("tok_train", {"vocab_size": 8192})
    run.write_summary("base_train", {"val_bpb": 1.99, "requeues": 3, "preemptions": 1, "time_limits": 0,
                                      "node_failures": 2, "world_sizes": [[0, 8], [40, 4], [90, 8]]})
    metrics = run.metrics("sft")
    for step in (1, 2):
        metrics.log({"step": step, "loss": 3.5, "dt": 0.5})
    (run.root / "slurm").mkdir()
    (run.root / "slurm" / "jobs.jsonl").write_text(json.dumps(
        {"job_id": "77", "kind": "gpu", "stages": ["sft"], "stdout": "/x/77_0_log.out"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "experiments.status", str(run.root)], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert "tok_train      done" in out and "val_bpb 1.99" in out
    assert "3 requeue(s): 1 preemption(s), 2 node failure(s), on 8 ranks, 4 from step 40, 8 from step 90" in out
    assert "sft            step 2/100, loss 3.5000, eta 1 min" in out  # 98 steps x 0.5 s
    assert "job 77" in out and "sft" in out and "base_eval" not in out


def test_status_of_a_missing_run_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.status", str(tmp_path / "nope")],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                                 "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 2 and result.stderr.startswith("error: no run folder")


def status(*args, runs_root=None, **kw):
    env = {"PATH": "/usr/bin:/bin", **({"NANOCHAT_BASE_DIR": str(runs_root.parent)} if runs_root else {})}
    return subprocess.run([sys.executable, "-m", "experiments.status", *args], capture_output=True, text=True,
                          env=env, **kw)


def make_run(root, name, stages, done=(), steps=0, num_iterations=100, dt=2.0):
    """A run folder as the pipeline leaves it: config.yaml, a summary per finished stage, base_train's metrics."""
    run = Run(root / name)
    run.root.mkdir(parents=True)
    run.config_path.write_text(f"stages: [{', '.join(stages)}]\nnum_iterations: {num_iterations}\n")
    for stage in done:
        run.write_summary(stage, {})
    for step in range(1, steps + 1):
        run.metrics("base_train").log({"step": step, "loss": 3.0, "dt": dt})
    return run


def test_status_help_is_argparse():
    result = status("--help")
    assert result.returncode == 0 and "--watch" in result.stdout and "--all" in result.stdout


def test_pipeline_eta_from_the_stage_in_progress(tmp_path):
    run = make_run(tmp_path, "r1", ["tok_train", "base_train", "sft"], done=["tok_train"], steps=10)
    out = status(str(run.root), check=True).stdout
    # 90 steps left x 2 s = 3 min; sft has no steps yet, and no finished run beside it: counted, not timed
    assert "pipeline       1 of 3 stages done; eta: 3 min (base_train 3 min), and 1 stage(s) not timed" in out


def test_pipeline_eta_times_later_stages_by_a_finished_run_of_the_same_depth(tmp_path):
    stages = ["tok_train", "base_train", "sft", "chat_eval_sft"]
    run = make_run(tmp_path, "d4-b", stages, done=["tok_train"], steps=10)
    for name, depth, sft_s in (("d4-a", 4, 600), ("d8", 8, 6000)):  # only the same depth counts
        other = make_run(tmp_path, name, stages, done=stages)
        other.config_path.write_text(other.config_path.read_text() + f"depth: {depth}\n")
        other.write_summary("sft", {"wall_time_s": sft_s})
    run.config_path.write_text(run.config_path.read_text() + "depth: 4\n")
    out = status(str(run.root), check=True).stdout
    # base_train 3 min left, sft took 10 min in d4-a; chat_eval_sft's summary there has no time: not timed
    assert ("pipeline       1 of 4 stages done; eta: 13 min (base_train 3 min, then sft 10 min as in d4-a), and 1 "
            "stage(s) not timed") in out


def test_status_without_a_run_lists_every_run_under_runs_root(tmp_path):
    runs_root = tmp_path / "runs"
    make_run(runs_root, "finished", ["tok_train", "base_train"], done=["tok_train", "base_train"])
    live = make_run(runs_root, "training", ["tok_train", "base_train"], done=["tok_train"], steps=2)
    live.slurm_dir.mkdir()
    live.jobs_path.write_text(json.dumps({"job_id": "9999991", "kind": "gpu", "stages": ["base_train"],
                                          "stdout": "/x/9999991_0_log.out"}) + "\n")
    for args in ([], ["--all"], ["--all", "--runs-root", str(runs_root)]):
        out = status(*args, runs_root=runs_root, check=True).stdout.splitlines()
        assert out[0] == f"runs under {runs_root}"
        assert out[1].split() == ["finished", "done", "(2", "stages)"]
        assert out[2].split()[:6] == ["training", "1/2", "done,", "base_train", "step", "2/100,"]
        assert "[job 9999991 " in out[2]
    empty = status("--all", "--runs-root", str(tmp_path / "none"))
    assert empty.returncode == 2 and empty.stderr.startswith("error: no runs under")


def test_watch_refreshes_until_the_pipeline_is_done(tmp_path):
    run = make_run(tmp_path, "r1", ["tok_train", "base_train"], done=["tok_train"], steps=2)
    # a live holder: this test's process, as a local launch would hold the run's lease
    run.lease_path.write_text(json.dumps({"owner": f"{socket.gethostname()}:{os.getpid()}", "host":
                                          socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}))
    watch = subprocess.Popen([sys.executable, "-m", "experiments.status", str(run.root), "--watch", "--every",
                              "0.2"], stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    seen = [watch.stdout.readline() for _ in range(12)]  # three refreshes of the four-line report
    assert sum(line.startswith("run ") for line in seen) >= 2 and watch.poll() is None
    run.write_summary("base_train", {"val_bpb": 1.5})
    rest, _ = watch.communicate(timeout=60)
    assert watch.returncode == 0 and rest.rstrip().endswith("pipeline       done: 2 of 2 stages")


def test_watch_stops_when_nothing_works_on_the_run(tmp_path):
    run = make_run(tmp_path, "r1", ["tok_train", "base_train"], done=["tok_train"], steps=2)
    result = status(str(run.root), "--watch", "--every", "0.2", timeout=60)  # no lease, no job: a dead run
    assert result.returncode == 0 and result.stdout.count("run ") == 1


def test_status_lists_the_runs_under_a_cluster_profiles_runs_root(tmp_path):
    runs_root = tmp_path / "scratch" / "runs"
    make_run(runs_root, "on-scratch", ["tok_train"], done=["tok_train"])
    (tmp_path / "conf" / "cluster").mkdir(parents=True)
    (tmp_path / "conf" / "cluster" / "site.yaml").write_text(
        f"# @package _global_\ncluster:\n  name: site\n  partition: gpu\n  runs_root: {runs_root}\n")
    env = {"PATH": "/usr/bin:/bin", "NANOCHAT_CONFIG_DIR": str(tmp_path / "conf"),
           "NANOCHAT_BASE_DIR": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-m", "experiments.status", "--cluster", "site"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [f"runs under {runs_root}",
                                              "  on-scratch                   done (1 stages)"]
