"""A run folder refuses a command whose config changes results, unless +resume_changed=true; free keys pass."""

import pytest
from omegaconf import OmegaConf

from experiments import launch as launcher
from experiments import pipeline
from experiments.resume_guard import changed_keys, is_free, split_resume_flag
from test_launch import launch

NO_STAGES = ("stages=[]",)  # the pipeline writes config.yaml and runs nothing


@pytest.fixture
def run_in(tmp_path, capsys):
    """Run the launcher in-process in one run folder under tmp_path; returns (exit code, stdout, stderr)."""
    def run(*overrides):
        code = launcher.main([*NO_STAGES, f"runs_root={tmp_path / 'runs'}", "run_name=r", *overrides])
        out = capsys.readouterr()
        return code, out.out, out.err
    run.config = tmp_path / "runs" / "r" / "config.yaml"
    return run


def saved(run):
    return OmegaConf.load(run.config)


def test_same_command_twice_resumes(run_in):
    assert run_in()[0] == 0
    first = run_in.config.read_text()
    code, _, err = run_in()
    assert code == 0 and err == "" and run_in.config.read_text() == first


@pytest.mark.parametrize("change, old, new", [
    (["depth=6"], "depth=4", "depth=6"),
    (["dataset=climbmix"], "dataset=embedded", "dataset=climbmix"),
    (["tok_train.vocab_size=4096"], "tok_train.vocab_size=8192", "tok_train.vocab_size=4096"),
    (["num_iterations=300"], "num_iterations=150", "num_iterations=300"),
    (["fused_loss=false"], "fused_loss=True", "fused_loss=False"),  # the sums' order: another last bit
    (["depth=6", "num_iterations=300", "eval_every=7"], "depth=4, num_iterations=150", "depth=6, num_iterations=300"),
])
def test_result_changing_key_refuses_in_one_line(run_in, change, old, new):
    assert run_in()[0] == 0
    before = run_in.config.read_text()
    code, _, err = run_in(*change)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: run r was started with ")
    assert f"started with {old};" in err and f"this command has {new}." in err
    assert "eval_every" not in err  # a free key that changed alongside is not named
    assert "run_name=" in err and "+resume_changed=true" in err and "Traceback" not in err
    assert run_in.config.read_text() == before  # the refused command wrote nothing


def test_compile_differs_only_between_two_explicit_values(run_in):
    """compile=null follows the checkpoint's own setting (recorded in its meta), so only true vs false refuses."""
    assert run_in("compile=false")[0] == 0
    code, _, err = run_in("compile=true")
    assert code == 2 and "started with compile=False; this command has compile=True." in err
    assert run_in()[0] == 0  # null: resumes as its checkpoint was trained


def test_a_run_from_before_the_fused_loss_resumes_only_with_its_plain_loss(run_in):
    assert run_in()[0] == 0
    saved_yaml = run_in.config.read_text()
    run_in.config.write_text("\n".join(line for line in saved_yaml.splitlines() if not line.startswith("fused_loss:")))
    code, _, err = run_in()
    assert code == 2 and "started with fused_loss=False; this command has fused_loss=True." in err
    assert "Add fused_loss=false to resume it as it began" in err and err.count("\n") == 1
    assert run_in("fused_loss=false")[0] == 0


@pytest.mark.parametrize("change", [
    ["eval_every=7"], ["wandb=offline"], ["device_batch_size=4"], ["nproc=2"], ["device=cpu"],
    ["sample_every=5", "core_metric_every=5", "save_every=5", "eval_tokens=1024"], ["tokenizer=/elsewhere/tok"],
])
def test_free_keys_change_on_resume(run_in, change):
    assert run_in()[0] == 0
    code, _, err = run_in(*change)
    assert code == 0 and err == ""
    key, value = change[0].split("=")
    assert str(saved(run_in)[key]).lower() == value.lower()  # config.yaml records the new values


@pytest.mark.parametrize("flag", ["+resume_changed=true", "resume_changed=true"])
def test_resume_changed_accepts_and_rewrites_config(run_in, flag):
    assert run_in()[0] == 0
    code, _, err = run_in("num_iterations=300", flag)
    assert code == 0 and err.count("\n") == 1 and err.startswith("warning: ")
    assert "num_iterations=150" in err and "num_iterations=300" in err
    assert saved(run_in).num_iterations == 300
    assert run_in("num_iterations=300")[0] == 0  # the new values are now the run's
    assert run_in()[0] == 2  # and the old ones differ from them


def test_flag_reaches_local_child_ranks(run_in, monkeypatch, small_tokenizer):
    forwarded = []
    monkeypatch.setattr(pipeline, "spawn_local", lambda nproc, overrides: forwarded.append(overrides))
    assert run_in()[0] == 0
    small_tokenizer.save(run_in.config.parent / "tok_train" / "tokenizer")  # base_train's inputs are checked first
    # 4096 tokens a step over 2 ranks: 4 rows of 512 each
    code, _, err = run_in("num_iterations=300", "nproc=2", "device_batch_size=4", "stages=[base_train]",
                          "+resume_changed=true")
    assert code == 0, err
    assert len(forwarded) == 1 and "+resume_changed=true" in forwarded[0]


def test_refusal_exits_2_from_the_command_line(tmp_path):
    common = ("stages=[]", f"runs_root={tmp_path / 'runs'}", "run_name=r")
    assert launch(*common, env_base=tmp_path).returncode == 0
    refused = launch(*common, "depth=6", env_base=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "started with depth=4; this command has depth=6" in refused.stderr
    accepted = launch(*common, "depth=6", "+resume_changed=true", env_base=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert OmegaConf.load(tmp_path / "runs" / "r" / "config.yaml").depth == 6


def test_guard_rules():
    assert split_resume_flag(["depth=4", "+resume_changed=true"]) == (["depth=4"], True)
    assert split_resume_flag(["depth=4"]) == (["depth=4"], False)
    assert is_free("cluster") and is_free("cluster.partition") and is_free("device_batch_size")
    assert not is_free("seed") and not is_free("total_batch_size") and not is_free("tok_train.vocab_size")
    assert not is_free("fused_loss")
    old = {"depth": 4, "cluster.partition": "a", "seed": 1}
    new = {"depth": 4, "cluster.partition": "b", "seed": 2, "new_key": 1}  # a key the old schema lacked: ignored
    assert changed_keys(old, new) == [("seed", 1, 2)]
