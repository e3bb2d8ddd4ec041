"""Sweeps (experiments/sweep/): depths x budgets into runs, one array per resource group, the manifest, reruns
that skip what is done or queued, and one-line errors. Submission goes through the real submitit code against a
fake `sbatch`/`squeue` on PATH, so the generated sbatch scripts can be read back."""

import json
import os
import stat

import pytest
from omegaconf import OmegaConf

from experiments.launch import main

# 2 budgets x 3 depths of tiny models, a few to a few dozen steps each (also the slurm tier's sweep)
TINY_SWEEP = ["+experiment=isoflop", "run_name=tiny", "dataset=embedded", "depths=[2,3,4]",
              "flops_budgets=[4e10,1e11]", "head_dim=64", "max_seq_len=128", "device_batch_size=8",
              "total_batch_size=1024", "warmup_steps=1", "eval_every=1000", "eval_tokens=4096",
              "stages=[tok_train,base_train]", "tok_train.vocab_size=1024", "tok_train.max_chars=2000000",
              "sweep_parallelism=2", "sweep_resources=[{max_depth:3,time_min:10},{max_depth:4,time_min:15}]"]
GROUP0 = ["tiny-4e10-d2", "tiny-4e10-d3", "tiny-1e11-d2", "tiny-1e11-d3"]  # array order: budget, then depth
GROUP1 = ["tiny-4e10-d4", "tiny-1e11-d4"]

FAKE_SBATCH = """#!/bin/bash
if [ -f "$FAKE_SLURM/refuse" ] && grep -q -- "$(cat "$FAKE_SLURM/refuse")" "$1"; then
  echo "sbatch: error: Batch job submission failed: Invalid qos specification" >&2; exit 1
fi
n=$(( $(cat "$FAKE_SLURM/counter" 2>/dev/null || echo 1000) + 1 ))
echo $n > "$FAKE_SLURM/counter"
cp "$1" "$FAKE_SLURM/$n.sh"
echo "Submitted batch job $n"
"""
FAKE_SQUEUE = """#!/bin/bash
cat "$FAKE_SLURM/queue" 2>/dev/null || true
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch that records each script as <id>.sh (ids from 1001) and refuses scripts that contain the text of
    the `refuse` file; squeue that prints the `queue` file."""
    folder = tmp_path / "fake_slurm"
    folder.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("sacct", "#!/bin/bash\n")):
        (folder / name).write_text(text)
        (folder / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    return folder


@pytest.fixture
def sweep_dir(tmp_path):
    return tmp_path / "base" / "runs" / "tiny"


def submit(capsys, *extra) -> tuple[int, list[str]]:
    code = main([*TINY_SWEEP, "+cluster=localslurm", *extra])
    return code, capsys.readouterr().out.splitlines()


def finish(sweep_dir, *names):
    for name in names:
        (sweep_dir / name / "base_train").mkdir(parents=True, exist_ok=True)
        (sweep_dir / name / "base_train" / "summary.json").write_text("{}")


def test_isoflop_submits_one_array_per_resource_group(fake_slurm, sweep_dir, capsys):
    code, out = submit(capsys)
    assert code == 0
    assert out[:2] == ["Submitted array 1002 (4 tasks)", "Submitted array 1003 (2 tasks)"], out
    assert "0 of 6 runs done; submitting 6" in out[2] and "job 1001: the shared tokenizer (tok_train, 1 rank)" in out[3]
    # the .err first: a failed run's traceback is there, not in the .out
    assert out[4] == f"    log: {sweep_dir}/slurm/1001_0_log.err (errors), 1001_0_log.out (output)"
    assert f"    logs: {sweep_dir}/slurm/1002_%a_0_log.err (errors), 1002_%a_0_log.out (output)" in out
    assert "cancel: scancel 1001 1002 1003" in out[-1]

    tok, array0, array1 = ((fake_slurm / f"{i}.sh").read_text() for i in (1001, 1002, 1003))
    assert "--array" not in tok and "--cpus-per-task=1" in tok
    for script, n, minutes in ((array0, 4, 10), (array1, 2, 15)):
        assert f"#SBATCH --array=0-{n - 1}%2" in script and f"#SBATCH --time={minutes}" in script
        assert "#SBATCH --dependency=afterok:1001" in script and "#SBATCH --kill-on-invalid-dep=yes" in script
        assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR2@20" in script
        assert f"--output={sweep_dir}/slurm/%A_%a_0_log.out" in script

    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert manifest["kind"] == "isoflop" and manifest["stages"] == ["base_train"]
    assert manifest["tokenizer"] == str(sweep_dir / "tokenizer" / "tok_train" / "tokenizer")
    runs = {r["run_name"]: r for r in manifest["runs"]}
    assert list(runs) == GROUP0[:2] + GROUP1[:1] + GROUP0[2:] + GROUP1[1:]  # budget, then depth
    assert [runs[n]["jobs"][0]["job_id"] for n in GROUP0 + GROUP1] == [
        "1002_0", "1002_1", "1002_2", "1002_3", "1003_0", "1003_1"]
    assert [runs[n]["plan"]["steps"] for n in GROUP0 + GROUP1] == [11, 4, 28, 10, 2, 4]
    [submission] = manifest["submissions"]
    assert submission["tokenizer_job"]["job_id"] == "1001" and [a["tasks"] for a in submission["arrays"]] == [4, 2]

    # each run folder holds an ordinary run's config: the sweep keys cleared, its own depth and budget
    config = OmegaConf.load(sweep_dir / "tiny-1e11-d4" / "config.yaml")
    assert (config.depth, config.target_flops, config.sweep, list(config.depths)) == (4, 1e11, None, [])
    assert config.tokenizer == manifest["tokenizer"] and config.stages == ["base_train"]
    assert (sweep_dir / "tokenizer" / "config.yaml").is_file()
    record = json.loads((sweep_dir / "tiny-1e11-d4" / "slurm" / "jobs.jsonl").read_text())
    assert record["job_id"] == "1003_1" and record["stdout"] == f"{sweep_dir}/slurm/1003_1_0_log.out"


def test_rerun_submits_only_runs_neither_done_nor_queued(fake_slurm, sweep_dir, capsys):
    assert submit(capsys)[0] == 0
    finish(sweep_dir, "tiny-4e10-d2", "tiny-4e10-d3")
    (fake_slurm / "queue").write_text("1001|RUNNING\n1002_3|PENDING\n99_1|RUNNING\n")
    code, out = submit(capsys)
    assert code == 0
    # tiny-1e11-d2 is alone in its group: submitit submits a plain job, not an array of one
    assert out[:2] == ["Submitted job 1004", "Submitted array 1005 (2 tasks)"], out
    assert "2 of 6 runs done, 1 queued or running; submitting 3" in out[2]
    assert "the arrays start after tokenizer job 1001, still running" in out[3]
    assert not (fake_slurm / "1006.sh").exists()  # no second tokenizer job
    assert "#SBATCH --dependency=afterok:1001" in (fake_slurm / "1004.sh").read_text()
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    jobs = {r["run_name"]: [j["job_id"] for j in r["jobs"]] for r in manifest["runs"]}
    assert jobs["tiny-1e11-d2"] == ["1002_2", "1004"] and jobs["tiny-1e11-d3"] == ["1002_3"]
    assert jobs["tiny-1e11-d4"] == ["1003_1", "1005_1"] and len(manifest["submissions"]) == 2

    finish(sweep_dir, *GROUP0, *GROUP1)
    code, out = submit(capsys)
    assert code == 0 and out == [f"Nothing to submit: 6 of 6 runs done ({sweep_dir})"]
    assert not (fake_slurm / "1006.sh").exists()


def test_a_refused_array_leaves_the_rest_recorded_and_a_rerun_submits_it(fake_slurm, sweep_dir, capsys):
    (fake_slurm / "refuse").write_text("--time=15")  # the second group's array
    code = main([*TINY_SWEEP, "+cluster=localslurm"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and "sbatch refused a job of sweep tiny (sbatch: error: Batch job submission failed" in err
    assert "submitted before it: 1001 1002 (in the manifest)" in err
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert [r["run_name"] for r in manifest["runs"] if r["jobs"]] == GROUP0[:2] + GROUP0[2:]

    (fake_slurm / "refuse").unlink()
    (fake_slurm / "queue").write_text("1001|PENDING\n" + "".join(f"1002_{i}|PENDING\n" for i in range(4)))
    code, out = submit(capsys)
    assert code == 0 and out[0] == "Submitted array 1003 (2 tasks)" and "4 queued or running; submitting 2" in out[1]
    assert "#SBATCH --dependency=afterok:1001" in (fake_slurm / "1003.sh").read_text()


def test_status_of_a_sweep_folder(fake_slurm, sweep_dir, capsys):
    from experiments.status import main as status

    assert submit(capsys)[0] == 0
    finish(sweep_dir, "tiny-4e10-d2")
    (fake_slurm / "queue").write_text("1002_1|RUNNING\n")
    assert status([str(sweep_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep {sweep_dir} (isoflop): 1 of 6 runs done"
    assert "tiny-4e10-d2" in out[1] and "done" in out[1]
    assert "tiny-4e10-d3" in out[2] and "not started" in out[2] and "[job 1002_1 RUNNING]" in out[2]


def test_a_rerun_submits_nothing_when_squeue_cannot_answer(fake_slurm, sweep_dir, capsys):
    """Fail closed: read as "nothing queued", a silent squeue would submit every run a second time."""
    from experiments.status import main as status

    assert submit(capsys)[0] == 0
    (fake_slurm / "squeue").write_text("#!/bin/bash\necho 'squeue: error: slurm_load_jobs' >&2; exit 1\n")
    code = main([*TINY_SWEEP, "+cluster=localslurm"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: squeue did not answer") and "submitted nothing" in err
    assert sorted(p.name for p in fake_slurm.glob("*.sh")) == ["1001.sh", "1002.sh", "1003.sh"]
    assert len(json.loads((sweep_dir / "manifest.json").read_text())["submissions"]) == 1
    (fake_slurm / "squeue").unlink()  # one that fails without a word: the same
    (fake_slurm / "squeue").symlink_to("/bin/false")
    assert main([*TINY_SWEEP, "+cluster=localslurm"]) == 2 and not (fake_slurm / "1004.sh").exists()
    capsys.readouterr()
    assert status([str(sweep_dir)]) == 0  # the status shows '?' for what it cannot know
    assert "[job 1002_1 ?]" in capsys.readouterr().out


def test_miniseries_trains_each_depth_at_the_ratio(fake_slurm, tmp_path, capsys):
    args = [a for a in TINY_SWEEP if not a.startswith(("+experiment", "flops_budgets", "sweep_resources"))]
    code = main(["+experiment=miniseries", *args, "depths=[2,3]", "sweep_resources=[]", "+cluster=localslurm"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[0] == "Submitted array 1002 (2 tasks)"
    manifest = json.loads((tmp_path / "base" / "runs" / "tiny" / "manifest.json").read_text())
    assert [r["run_name"] for r in manifest["runs"]] == ["tiny-d2", "tiny-d3"]
    assert all(r["flops_budget"] is None and 11 < r["plan"]["tokens_per_param"] <= 12 for r in manifest["runs"])
    assert OmegaConf.load(tmp_path / "base" / "runs" / "tiny" / "tiny-d2" / "config.yaml").target_flops == -1


@pytest.mark.parametrize("overrides, message", [
    (["+experiment=isoflop", "depths=[]"], "sweep=isoflop needs depths=[...], at least one"),
    (["depths=[2,3]"], "depths= and flops_budgets= are sweep keys: add +experiment=miniseries"),
    (["+experiment=miniseries", "flops_budgets=[1e18]"], "flops_budgets= is for sweep=isoflop"),
    (["+experiment=isoflop", "num_iterations=10"], "num_iterations=10 would override each run's budget"),
    (["+experiment=isoflop", "depths=[8,30]"], "depth(s) [30] are above every sweep_resources max_depth (20)"),
    (["+experiment=isoflop", "flops_budgets=[1e18,1.001e18]"], "give runs the same name"),
    (["sweep=nope", "depths=[2]"], "unknown sweep='nope'; valid: miniseries, isoflop"),
    ([*TINY_SWEEP, "flops_budgets=[4e10,1e9]"], "run tiny-1e9-d2: the horizon gives 0 steps"),
    ([*TINY_SWEEP, "cluster.partition="], "cluster profile 'localslurm' has no partition"),
])
def test_bad_sweeps_are_one_line_exit_2(fake_slurm, tmp_path, capsys, overrides, message):
    code = main([*overrides, "+cluster=localslurm"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "base" / "runs").exists() and not (fake_slurm / "1001.sh").exists()


@pytest.mark.slow
def test_without_a_cluster_the_runs_go_one_after_another_here(tmp_path, capsys, one_torch_thread):
    args = [*TINY_SWEEP, "depths=[2,3]", "flops_budgets=[4e10]"]
    assert main(args) == 0
    assert "0 of 2 runs done; running 2 here, one after another" in capsys.readouterr().out
    sweep_dir = tmp_path / "base" / "runs" / "tiny"
    steps = [json.loads((sweep_dir / n / "base_train" / "summary.json").read_text())["step"]
             for n in ("tiny-4e10-d2", "tiny-4e10-d3")]
    assert steps == [11, 4]
    assert main(args) == 0 and capsys.readouterr().out.startswith("Nothing to run: 2 of 2 runs done")
