import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from experiments.launch import main


def launch(*overrides, env_base, **extra_env):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(env_base), **extra_env}
    return subprocess.run([sys.executable, "-m", "experiments.launch", *overrides], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("override, message", [
    ("dept=3", "unknown key 'dept'; did you mean 'depth'? valid keys: "),
    ("depth=abc", "could not be converted to Integer"),
    ("tok_train.vocab=3", "unknown key 'vocab' in TokTrainConfig; did you mean 'vocab_size'? valid keys: vocab_size"),
    ("stages=[tok_train,nope]", "unknown stage(s) ['nope']"),
    ("dataset=nope", "unknown dataset='nope'"),
    ("task_data=hub", "SmolTalk is not staged: run `python -m tasks.stage`"),  # before any stage starts
    ("rl.task=nope", "rl.task='nope' is not one of 'gsm8k', 'arithmetic'"),
    ("chat_eval.tasks=[MMLU,Nope]", "chat_eval.tasks: unknown task 'Nope'"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, override, message):
    result = launch(override, env_base=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, message", [
    ("wandb=ofline", "wandb='ofline' is not one of 'disabled', 'offline', 'online' (did you mean 'offline'?)"),
    ("device=cdua", "device='cdua' is not one of '', 'cuda', 'cpu', 'mps' (did you mean 'cuda'?)"),
    ("rl.task=arithmetc", "(did you mean 'arithmetic'?)"),
    ("base_eval.core=of", "(did you mean 'off'?)"),
    ("depth=-3", "depth=-3 must be at least 1"),
    ("depth=0", "depth=0 must be at least 1"),
    ("head_dim=0", "head_dim=0 must be at least 2 and a multiple of 2"),
    ("head_dim=63", "head_dim=63 must be at least 2 and a multiple of 2"),
    ("device_batch_size=0", "device_batch_size=0 must be at least 1"),
    ("aspect_ratio=-1", "aspect_ratio=-1 must be at least 1"),
    ("total_batch_size=0", "total_batch_size=0 must be at least 1 (or -1: derived)"),
    ("window_pattern=XYZ", "window_pattern='XYZ' must be letters S and L only"),
    ("cluster.nodes=4", "cluster.nodes=4 sets a key of a cluster profile, but none is chosen: add +cluster=NAME"),
    ("device=cuda", "device=cuda, but torch sees no CUDA GPU"),
    ("nproc=64", "nproc=64, but this machine has"),
])
def test_bad_values_are_one_line_at_the_prompt_before_anything_is_written(tmp_path, monkeypatch, capsys, override,
                                                                          message):
    """In process (each case would cost a second of imports as a subprocess); the exit code and the one line are
    what the command gives."""
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert main([override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_cluster_profile_without_slurm_here_is_one_line(tmp_path):
    """+cluster= on a machine without sbatch (a laptop, a container without Slurm's commands): not submitit's
    traceback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    result = launch("+cluster=h100", "dataset=embedded", "stages=[tok_train]", env_base=tmp_path, PATH=str(bin_dir))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "this machine has no sbatch: submit from the cluster's login node" in result.stderr


def test_a_python_without_the_packages_says_so_in_one_line(tmp_path):
    """The README's commands followed without activating the venv: `python -m experiments.launch` from a Python
    that has none of the packages (here -S: no site-packages at all)."""
    result = subprocess.run([sys.executable, "-S", "-m", "experiments.launch"], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "is not installed for" in result.stderr and "source .venv/bin/activate" in result.stderr


def test_missing_tokenizer_names_the_stage_to_run(tmp_path):
    result = launch("stages=[tok_eval]", env_base=tmp_path)
    assert result.returncode == 2 and "run the tok_train stage first" in result.stderr


@pytest.mark.slow
def test_embedded_tokenizer_stages_offline_then_skip(tmp_path):
    dead_proxy = "http://127.0.0.1:9"  # any network use would fail
    first = launch("stages=[tok_train,tok_eval]", env_base=tmp_path, http_proxy=dead_proxy, https_proxy=dead_proxy)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "embedded-d4"
    tok = json.loads((run / "tok_train" / "summary.json").read_text())
    assert tok["vocab_size"] == 8192 and tok["train_chars"] > 5_000_000
    assert (run / "tok_train" / "tokenizer" / "tokenizer.pkl").is_file()
    evals = json.loads((run / "tok_eval" / "summary.json").read_text())
    assert evals["texts"]["embedded-val"]["ratio"] > 3.0  # English prose compresses to >3 bytes per token
    assert evals["references_missing"] == ["gpt2", "cl100k_base"]
    again = launch("stages=[tok_train,tok_eval]", env_base=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2


def test_hydra_flags_help_cfg_info_and_completion(tmp_path, monkeypatch, capsys):
    """The flags researchers type with Hydra apps, answered without writing anything."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for flag in ("--help", "-h"):
        assert main([flag]) == 0
        page = capsys.readouterr().out
        assert "+cluster=NAME" in page and "a100, h100, localslurm" in page and "miniseries" in page
        assert "-m sweeps every combination of the key=a,b values" in page
        assert re.search(r"^  depth +4$", page, re.M) and "embedded-d4 (<experiment_name>-d<depth>)" in page
    assert main(["--cfg", "job", "depth=3", "+cluster=h100"]) == 0
    composed = yaml.safe_load(capsys.readouterr().out)
    assert composed["depth"] == 3 and composed["cluster"]["name"] == "h100" and composed["dataset"] == "climbmix"
    assert main(["--info", "+cluster=h100", "run_name=x"]) == 0
    info = capsys.readouterr().out
    assert "cluster/h100.yaml, preset/gpu.yaml" in info and f"run folder: {tmp_path}/runs/x" in info
    assert not (tmp_path / "runs").exists()
    assert main(["-sc", "install=bash"]) == 0
    script = tmp_path / "complete.sh"
    script.write_text(capsys.readouterr().out)

    def complete(line: str) -> list[str]:  # as bash calls it: the line so far, its words split at '=' too
        words = line.replace("=", " = ").split() + ([""] if line.endswith((" ", "=")) else [])
        cmd = (f"source {script}; COMP_LINE='{line}'; COMP_POINT={len(line)}; COMP_WORDS=({' '.join(words)}); "
               f"COMP_CWORD={len(words) - 1}; _nanochat_launch 2>/dev/null; echo ${{COMPREPLY[@]}}")
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True).stdout.split()

    assert complete("nanochat-launch wand") == ["wandb=", "wandb=disabled", "wandb=offline", "wandb=online",
                                                "wandb_project="]
    assert complete("nanochat-launch depth=4 wandb=of") == ["offline"]  # the word after '=' is replaced
    assert complete("nanochat-launch +cluster=h") == ["h100"]
    assert complete("nanochat-launch sft.init_") == ["sft.init_lr_frac="]


@pytest.mark.parametrize("argv, message", [
    (["--cfg", "hydra"], "--cfg takes 'job'"),
    (["depth=3", "--help"], "flags go before the overrides: --help"),
    (["--multirun"], "-m sweeps keys given as key=a,b (or choice(a,b), range(start,stop)), and there is none"),
    (["--bogus"], "unknown flag --bogus"),
])
def test_a_wrong_flag_is_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
