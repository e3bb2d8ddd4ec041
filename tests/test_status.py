import json
import subprocess
import sys

from nanochat.runs import Run


def test_status_shows_done_and_running_stages(tmp_path):
    run = Run(tmp_path / "runs" / "r1")
    run.root.mkdir(parents=True)
    run.config_path.write_text("depth: 4\nnum_iterations: 100\n")
    run.write_summary("tok_train", {"vocab_size": 8192})
    run.write_summary("base_train", {"val_bpb": 1.99, "requeues": 3, "preemptions": 1, "time_limits": 0,
                                      "node_failures": 2})
    metrics = run.metrics("sft")
    for step in (1, 2):
        metrics.log({"step": step, "loss": 3.5, "dt": 0.5})
    (run.root / "slurm").mkdir()
    (run.root / "slurm" / "jobs.jsonl").write_text(json.dumps(
        {"job_id": "77", "kind": "gpu", "stages": ["sft"], "stdout": "/x/77_0_log.out"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "experiments.status", str(run.root)], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert "tok_train      done" in out and "val_bpb 1.99" in out and "3 requeue(s): 1 preemption(s), 2 node failure(s)" in out
    assert "sft            step 2/100, loss 3.5000, eta 1 min" in out  # 98 steps x 0.5 s
    assert "job 77" in out and "sft" in out and "base_eval" not in out


def test_status_of_a_missing_run_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.status", str(tmp_path / "nope")],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                                 "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 2 and result.stderr.startswith("error: no run folder")
