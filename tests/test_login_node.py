"""The login node's side: a submission and a status query import no torch (1.6 s of a 2.6 s submission, measured
on 2 cores), and what the GPU job will read is checked before anything is submitted, one line each."""

import json
import os
import subprocess
import sys

from nanochat.runs import Run

SUBMISSION_PATH = """
import sys
from experiments.config import load_config
from experiments.launch import main
from experiments.pipeline import prepare_run
import experiments.job, experiments.slurm, submitit  # what submit() imports to pickle the job
prepare_run(load_config(["+cluster=localslurm", "runs_root=" + sys.argv[1]]), submitting=True)
print("torch" in sys.modules)
"""


def no_torch(code: str, *args: str) -> None:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False", out


def test_a_submission_imports_no_torch(tmp_path):
    no_torch(SUBMISSION_PATH, str(tmp_path / "runs"))
    assert (tmp_path / "runs" / "embedded-d4" / "config.yaml").is_file()  # prepare_run did check and write


def test_launch_help_is_the_usage_without_torch():
    no_torch("""
import sys
from experiments.launch import main
assert main(["--help"]) == 0
print("torch" in sys.modules)
""")
    shown = subprocess.run([sys.executable, "-m", "experiments.launch", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m experiments.launch ")


def test_status_imports_no_torch(tmp_path):
    run = Run(tmp_path / "r")
    run.root.mkdir()
    run.config_path.write_text("stages: [tok_train, base_train]\n")
    run.write_summary("tok_train", {})
    run.slurm_dir.mkdir()
    run.jobs_path.write_text(json.dumps({"job_id": "1", "kind": "gpu", "stages": ["base_train"],
                                         "stdout": "/x/1_0_log.out"}) + "\n")
    no_torch(f"""
import sys
from experiments.status import main
for args in (["{run.root}"], ["--all", "--runs-root", "{tmp_path}"]):
    main(args)
try:
    main(["--help"])
except SystemExit:
    pass
print("torch" in sys.modules)
""")


def test_cluster_data_and_runs_go_to_the_sites_scratch(tmp_path, monkeypatch, capsys):
    from experiments.config import load_config, runs_root

    monkeypatch.delenv("NANOCHAT_BASE_DIR")
    monkeypatch.setenv("NANOCHAT_SCRATCH", str(tmp_path / "scratch"))
    cfg = load_config(["+cluster=localslurm"])
    assert cfg.cluster.base_dir == str(tmp_path / "scratch" / "nanochat")  # what the jobs are told
    assert runs_root(cfg) == tmp_path / "scratch" / "nanochat" / "runs"
    assert capsys.readouterr().err == ""


def test_a_profile_without_scratch_says_so_once(tmp_path, monkeypatch, capsys):
    from experiments.config import load_config

    monkeypatch.delenv("NANOCHAT_BASE_DIR")
    monkeypatch.delenv("NANOCHAT_SCRATCH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(["+cluster=localslurm"])
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "'localslurm' names no scratch" in note and "NANOCHAT_SCRATCH=" in note
    assert cfg.cluster.base_dir == str(tmp_path / ".cache" / "nanochat")  # it goes on with the default
    load_config(["+cluster=localslurm"])
    assert capsys.readouterr().err == ""  # said once per profile
    load_config(["+cluster=a100"])
    assert "'a100' names no scratch" in capsys.readouterr().err


def test_a_profile_base_dir_is_where_the_submission_checks(tmp_path):
    from experiments.config import load_config

    load_config(["+cluster=localslurm", f"cluster.base_dir={tmp_path / 'site'}"])
    assert os.environ["NANOCHAT_BASE_DIR"] == str(tmp_path / "site")


def launch_here(tmp_path, capsys, *overrides):
    """The launcher in-process, its stages stopped before any starts: (exit code, stderr)."""
    from experiments import launch

    code = launch.main([f"runs_root={tmp_path / 'runs'}", "run_name=r", *overrides])
    return code, capsys.readouterr().err


def staged_climbmix(tmp_path, train_shards: int) -> None:
    folder = tmp_path / "base" / "base_data_climbmix"  # conftest's NANOCHAT_BASE_DIR
    folder.mkdir(parents=True)
    for index in [*range(train_shards), 6542]:  # the last shard is the validation shard
        (folder / f"shard_{index:05d}.parquet").touch()


def test_shards_for_the_planned_tokens(tmp_path, capsys):
    staged_climbmix(tmp_path, 3)
    # 30,000 steps x 4,096 tokens = 123M tokens: 4 shards at about 34M tokens a shard
    code, err = launch_here(tmp_path, capsys, "dataset=climbmix", "num_iterations=30000",
                            "stages=[tok_train,base_train]")
    assert code == 2 and err.count("\n") == 1
    assert "only 3 of 4 climbmix training shards are staged" in err
    assert err.rstrip().endswith("stage them with: python -m nanochat.dataset --dataset climbmix -n 4")
    code, err = launch_here(tmp_path, capsys, "dataset=climbmix", "num_iterations=20000", "stages=[]")
    assert code == 0, err  # 82M tokens: 3 shards do


def test_a_tokenizer_or_the_stage_that_makes_it(tmp_path, capsys):
    code, err = launch_here(tmp_path, capsys, "stages=[base_train]")
    assert code == 2 and err == "error: run r has no tokenizer: run the tok_train stage first " \
                                "(stages=[tok_train,...]) or pass tokenizer=PATH\n"


def test_the_core_bundle_when_base_eval_wants_it(tmp_path, capsys, small_tokenizer):
    small_tokenizer.save(tmp_path / "runs" / "r" / "tok_train" / "tokenizer")
    code, err = launch_here(tmp_path, capsys, "stages=[base_eval]", "base_eval.core=required")
    assert code == 2 and err.count("\n") == 1 and "the eval_bundle is not staged in" in err
    assert err.rstrip().endswith("stage it with: python -m nanochat.dataset --assets-only")
    # auto: base_eval runs without CORE; one line says so before it starts (here: before it fails for want of
    # a model, which is what a missing input stage does at the stage)
    code, err = launch_here(tmp_path, capsys, "stages=[base_eval]", "base_eval.core=auto")
    assert err.startswith("note: base_eval's CORE will read n/a: the eval_bundle is not staged in")


def test_chat_tasks_for_the_chat_stages(tmp_path, capsys, small_tokenizer):
    small_tokenizer.save(tmp_path / "runs" / "r" / "tok_train" / "tokenizer")
    code, err = launch_here(tmp_path, capsys, "stages=[sft]", "task_data=hub")
    assert code == 2 and err.count("\n") == 1 and "python -m tasks.stage" in err


def test_room_for_a_checkpoint_in_a_writable_runs_root(tmp_path, capsys):
    # d200: ~400B parameters, about 4 PB a checkpoint at 11 bytes each
    code, err = launch_here(tmp_path, capsys, "depth=200", "stages=[tok_train,base_train]")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: no room for a checkpoint of this model")
    (tmp_path / "file").touch()
    code, err = launch_here(tmp_path, capsys, f"runs_root={tmp_path / 'file' / 'runs'}", "stages=[tok_train]")
    assert code == 2 and err.startswith(f"error: cannot write the run folder {tmp_path / 'file' / 'runs' / 'r'}")
