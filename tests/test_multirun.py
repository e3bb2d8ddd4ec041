"""`-m`/`--multirun` over any keys (experiments/sweep/multirun.py): every combination of the swept values is a run
of a sweep, named after its values; on a cluster one job array per resource group (against the fake sbatch and
squeue of test_sweep), here one run after another; a rerun skips the finished runs; one-line refusals."""

import json

import pytest
from omegaconf import OmegaConf

from experiments.launch import main
from experiments.sweep.plan import value_label
from test_sweep import fake_slurm  # noqa: F401 (fixture)

# tiny runs of 3 steps on the embedded data, with depth= (or a depth axis) added (also the slurm tier's multirun)
TINY_MULTIRUN = ["run_name=mr", "dataset=embedded", "head_dim=64", "max_seq_len=128",
                 "device_batch_size=4", "total_batch_size=512", "num_iterations=3", "warmup_steps=1", "eval_every=-1",
                 "eval_tokens=4096", "stages=[tok_train,base_train]", "tok_train.vocab_size=1024",
                 "tok_train.max_chars=2000000"]
# two depths into two arrays, their runs in the order typed: the first key outermost
GRID = ["matrix_lr=0.01,0.02", "depth=2,3", "sweep_resources=[{max_depth:2,time_min:5},{max_depth:3,time_min:7}]"]
NAMES = ["mr-matrix_lr0.01-d2", "mr-matrix_lr0.01-d3", "mr-matrix_lr0.02-d2", "mr-matrix_lr0.02-d3"]


@pytest.fixture
def sweep_dir(tmp_path):
    return tmp_path / "base" / "runs" / "mr"


def multirun(capsys, *args) -> tuple[int, list[str]]:
    code = main(["-m", *TINY_MULTIRUN, *args])
    return code, capsys.readouterr().out.splitlines()


def test_multirun_submits_one_array_per_resource_group(fake_slurm, sweep_dir, capsys):
    code, out = multirun(capsys, "+cluster=localslurm", *GRID)
    assert code == 0
    assert out[:2] == ["Submitted array 1002 (2 tasks)", "Submitted array 1003 (2 tasks)"], out
    assert "sweep mr: 0 of 4 runs done; submitting 4" in out[2] and "job 1001: the shared tokenizer" in out[3]
    for array, minutes in ((1002, 5), (1003, 7)):
        script = (fake_slurm / f"{array}.sh").read_text()
        assert "#SBATCH --array=0-1" in script and f"#SBATCH --time={minutes}" in script
        assert "#SBATCH --dependency=afterok:1001" in script

    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert manifest["kind"] == "multirun"
    assert manifest["axes"] == [{"key": "matrix_lr", "values": ["0.01", "0.02"]},
                                {"key": "depth", "values": ["2", "3"]}]
    assert [r["run_name"] for r in manifest["runs"]] == NAMES
    assert manifest["runs"][3]["values"] == {"matrix_lr": "0.02", "depth": "3"}
    assert [r["jobs"][0]["job_id"] for r in manifest["runs"]] == ["1002_0", "1003_0", "1002_1", "1003_1"]
    argv = manifest["submissions"][0]["argv"]
    assert argv[0] == "-m" and argv[-2:] == ["matrix_lr=0.01,0.02", "depth=2,3"]
    config = OmegaConf.load(sweep_dir / "mr-matrix_lr0.02-d3" / "config.yaml")
    assert (config.matrix_lr, config.depth, config.run_name, config.sweep) == (0.02, 3, "mr-matrix_lr0.02-d3", None)
    assert config.tokenizer == manifest["tokenizer"] and config.stages == ["base_train"]


def test_a_rerun_submits_only_what_is_neither_done_nor_queued_and_status_shows_the_axes(fake_slurm, sweep_dir,
                                                                                        capsys):
    from experiments.status import main as status

    assert multirun(capsys, "+cluster=localslurm", *GRID)[0] == 0
    for name in NAMES[:2]:
        (sweep_dir / name / "base_train").mkdir(parents=True)
        (sweep_dir / name / "base_train" / "summary.json").write_text("{}")
    (fake_slurm / "queue").write_text("1001|RUNNING\n1002_1|PENDING\n")
    code, out = multirun(capsys, "+cluster=localslurm", *GRID)
    assert code == 0 and out[0] == "Submitted job 1004", out  # mr-matrix_lr0.02-d3 alone, a plain job
    assert "2 of 4 runs done, 1 queued or running; submitting 1" in out[1]
    assert status([str(sweep_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweep {sweep_dir} (multirun of matrix_lr x depth): 2 of 4 runs done"
    assert "mr-matrix_lr0.02-d2" in lines[3] and "[job 1002_1 PENDING]" in lines[3]


def test_names_are_plain_and_short():
    assert value_label("sft.init_lr_frac", "0.5") == "init_lr_frac0.5"
    assert value_label("window_pattern", "'S L'") == "window_patternS_L"
    assert value_label("depth", "12") == "d12" and value_label("target_flops", 2.15e18) == "2.15e18"


@pytest.mark.parametrize("args, message", [
    (["depth=2"], "-m sweeps keys given as key=a,b (or choice(a,b), range(start,stop)), and there is none"),
    (["matrix_lr=0.01,0.02", "matrix_lr=0.03"], "matrix_lr is both swept and set (or swept twice)"),
    (["matrix_lr=interval(0,1)"], "-m sweeps a list of values: key=a,b, choice(a,b) or range(start,stop,step)"),
    (["tok_train.vocab_size=512,1024"], "the runs of a sweep share one tokenizer, made from dataset, tokenizer"),
    (["stages=[base_train],[sft]"], "stages is the sweep's own, the same for all its runs"),
    (["+experiment=d12,speedrun"], "-m sweeps keys, not the config groups preset, +experiment, +cluster"),
    (["cluster.time_min=5,10"], "the cluster.* keys are the jobs' resources"),
    (["+experiment=isoflop", "matrix_lr=0.01,0.02"], "-m does not nest in sweep=isoflop (+experiment=isoflop)"),
    (["depth=2", "matrix_lr=0.01,0.010"], "matrix_lr=0.01 and matrix_lr=0.01 give runs the same name mr-matrix_lr0.01"),
    (["matrix_lr=0.01,abc"], "run mr-matrix_lrabc: Error merging override matrix_lr=abc"),
    (["depth=2,x"], "depth=x is not a whole number"),
    (["run_name=tiny", "depth=2,3"], "holds a sweep of kind isoflop; give this multirun sweep another run_name"),
])
def test_bad_multiruns_are_one_line_exit_2(fake_slurm, tmp_path, capsys, args, message):
    if "run_name=tiny" in args:  # a folder that holds another kind of sweep
        (tmp_path / "base" / "runs" / "tiny").mkdir(parents=True)
        (tmp_path / "base" / "runs" / "tiny" / "manifest.json").write_text('{"kind": "isoflop"}')
    code = main(["-m", *TINY_MULTIRUN, *args, "+cluster=localslurm"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "base" / "runs" / "mr").exists() and not (fake_slurm / "1001.sh").exists()


def test_a_sweep_without_m_says_to_add_it(capsys):
    assert main(["matrix_lr=0.01,0.02"]) == 2
    err = capsys.readouterr().err
    assert "Ambiguous value for argument 'matrix_lr=0.01,0.02'; to sweep it, put -m first" in err


@pytest.mark.parametrize("flags", [["-m", "--info"], ["--info", "--multirun"]])
def test_info_after_m_lists_the_planned_runs_and_writes_nothing(fake_slurm, sweep_dir, capsys, flags):
    assert main([*flags, *TINY_MULTIRUN, *GRID, "+cluster=localslurm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"sweep folder: {sweep_dir}", "multirun of matrix_lr (2) x depth (2): 4 runs"]
    assert [line.split()[0] for line in lines[2:]] == NAMES
    assert lines[3].split()[1:] == ["matrix_lr=0.01", "depth=3", "3", "steps"]
    assert not sweep_dir.exists() and not (fake_slurm / "1001.sh").exists()


def test_cfg_job_after_m_prints_each_runs_config(sweep_dir, capsys):
    assert main(["-m", "--cfg", "job", *TINY_MULTIRUN, "depth=2", "matrix_lr=0.01,0.02"]) == 0
    runs = capsys.readouterr().out.split("# run ")[1:]
    configs = [OmegaConf.create(text.split("\n", 1)[1]) for text in runs]
    assert [text.split("\n", 1)[0] for text in runs] == ["mr-matrix_lr0.01", "mr-matrix_lr0.02"]
    assert [(c.run_name, c.matrix_lr, c.depth) for c in configs] == [("mr-matrix_lr0.01", 0.01, 2),
                                                                      ("mr-matrix_lr0.02", 0.02, 2)]
    assert not sweep_dir.exists()


@pytest.mark.slow
def test_without_a_cluster_the_runs_go_one_after_another_and_a_rerun_skips_the_finished(sweep_dir, capsys,
                                                                                        one_torch_thread):
    assert main(["--multirun", *TINY_MULTIRUN, "depth=2", "matrix_lr=0.01,0.02"]) == 0
    assert "0 of 2 runs done; running 2 here, one after another" in capsys.readouterr().out
    first = sweep_dir / "mr-matrix_lr0.01" / "base_train" / "summary.json"
    for name, lr in (("mr-matrix_lr0.01", 0.01), ("mr-matrix_lr0.02", 0.02)):
        assert json.loads((sweep_dir / name / "base_train" / "summary.json").read_text())["step"] == 3
        assert OmegaConf.load(sweep_dir / name / "config.yaml").matrix_lr == lr
    finished = first.stat().st_mtime_ns
    assert main(["-m", *TINY_MULTIRUN, "depth=2", "matrix_lr=0.01,0.02,0.03"]) == 0
    assert "2 of 3 runs done; running 1 here, one after another" in capsys.readouterr().out
    assert (sweep_dir / "mr-matrix_lr0.03" / "base_train" / "summary.json").is_file()
    assert first.stat().st_mtime_ns == finished
    assert len(json.loads((sweep_dir / "manifest.json").read_text())["runs"]) == 3
