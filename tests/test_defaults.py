"""Each default lives in one place; where a file that cannot import Python must repeat one, a test keeps them equal."""

import re
from pathlib import Path

from experiments.cluster import ClusterConfig
from nanochat.config import Config, learning_rates
from nanochat.stage_table import BY_NAME, CHAT_STAGES, CPU_JOB_STAGES, DEFAULT_STAGES, STAGES

ROOT = Path(__file__).resolve().parent.parent


def test_speedrun_script_signals_as_early_as_the_cluster_profiles():
    script = (ROOT / "slurm" / "speedrun.slurm").read_text()
    assert re.search(r"^#SBATCH --signal=USR2@(\d+)$", script, re.M).group(1) == str(ClusterConfig.signal_lead_s)
    # and the batch step knows it (slurm/after_srun.sh: a rank the signal killed near the time limit is requeued)
    assert re.search(r"NANOCHAT_SIGNAL_LEAD_S=(\d+)", script).group(1) == str(ClusterConfig.signal_lead_s)
    for profile in (ROOT / "experiments" / "conf" / "cluster").glob("*.yaml"):  # only the test cluster's differs
        assert "signal_lead_s" not in profile.read_text() or profile.stem == "localslurm", profile


def test_learning_rates_come_from_the_config():
    assert learning_rates() == {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5}
    assert learning_rates(Config(matrix_lr=0.01))["matrix_lr"] == 0.01


def test_stage_table_answers_every_question_about_a_stage():
    assert STAGES[0] == "tok_train" and STAGES[-1] == "chat_eval_rl"
    assert "mid_train" not in DEFAULT_STAGES and Config().stages == DEFAULT_STAGES
    assert CPU_JOB_STAGES == ["tok_train", "tok_eval"]
    assert list(CHAT_STAGES.items()) == [("rl", "rl"), ("sft", "sft"), ("base", "base_train")]
    assert BY_NAME["sft"].inputs == ("mid_train", "base_train") and BY_NAME["rl"].input_key == "sft_checkpoint"
    for stage in BY_NAME.values():
        assert callable(stage.load()), stage.name
        assert all(BY_NAME[name].makes for name in stage.inputs), stage.name


def test_gpu_profiles_and_experiments_get_upstreams_values_not_the_embedded_presets(capsys):
    """Every key the embedded preset sizes for a laptop is, on a GPU profile or an experiment, what the experiment
    or preset/gpu.yaml sets, else upstream's default from the schema (a speedrun once trained SFT on fixtures)."""
    from omegaconf import OmegaConf

    from experiments.config import load_config

    conf = ROOT / "experiments" / "conf"
    keys = [k for k, _ in _leaf_items(OmegaConf.load(conf / "preset" / "embedded.yaml")) if k != "experiment_name"]
    schema = {key: _get(Config(), key) for key in keys}
    gpu = dict(_leaf_items(OmegaConf.load(conf / "preset" / "gpu.yaml")))
    runs = {("+cluster=h100",): {}, ("+cluster=a100",): {}}
    runs.update({(f"+experiment={p.stem}",): dict(_leaf_items(OmegaConf.load(p)))
                 for p in (conf / "experiment").glob("*.yaml")})
    for overrides, own in runs.items():
        cfg = load_config(list(overrides))
        expected = {key: own.get(key, gpu.get(key, schema[key])) for key in keys}
        assert {key: _get(cfg, key) for key in keys} == expected, overrides
    assert load_config(["+cluster=localslurm"]).task_data == "fixture"  # the test cluster stays CPU-sized
    capsys.readouterr()  # the profiles' note about scratch


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _leaf_items(tree, prefix: str = ""):
    """(dotted key, value) of every leaf of a YAML file's tree; the Hydra defaults list is not a key."""
    for key, value in tree.items():
        if key == "defaults":
            continue
        if hasattr(value, "items"):
            yield from _leaf_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
