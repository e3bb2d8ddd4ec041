"""Resuming a run folder with a config that would change its results refuses, naming the keys and the way out.

Keys that change no result may differ freely on resume: which stages to run, where and on what the run executes
(runs_root, device, nproc, cluster profile), logging, evaluation/sampling/checkpoint cadence, the
tokenizer path (the same files may be mounted at different paths on different machines), and device_batch_size:
the total batch is its own key (`total_batch_size`, compared like any other) and, when -1, is derived from
depth and horizon, never from the device batch, so the per-step batch stays the same and only gradient
accumulation changes. The number of ranks is free in the same way (nproc, the cluster profile's nodes and GPUs):
the total batch stays and each step reads the same rows, as long as the new number divides the stage's virtual
data shards, which its checkpoint records and experiments.preflight checks (nanochat.reshard). Every other
differing key refuses unless the command says `+resume_changed=true`.
A key missing from the old config.yaml (the schema grew since) is ignored.
"""

from pathlib import Path

from omegaconf import OmegaConf

from nanochat.common import UserError

# the launcher's flag (not a schema key): resume even though result-changing keys differ
RESUME_CHANGED_FLAGS = ("+resume_changed=true", "resume_changed=true")

FREE_KEYS = frozenset({
    "stages", "runs_root", "run_name", "experiment_name", "nproc", "device", "wandb", "wandb_project",
    "eval_every", "eval_tokens", "core_metric_every", "core_metric_max_per_task", "sample_every", "log_every", "save_every",
    "save_every_minutes", "keep_checkpoints", "async_save", "max_requeues", "max_preemptions",
    "max_time_limits", "max_node_failures", "startup_timeout_s", "step_timeout_s", "tokenizer",
    "device_batch_size",
    "gpu_hour_price", "sft.eval_every", "mid_train.eval_every", "rl.eval_every",
    "sweep", "depths", "flops_budgets", "sweep_parallelism", "sweep_resources",  # a sweep's, not its runs'
})


def split_resume_flag(overrides: list[str]) -> tuple[list[str], bool]:
    """The overrides without the resume flag, and whether it was there."""
    kept = [o for o in overrides if o.strip().lower() not in RESUME_CHANGED_FLAGS]
    return kept, len(kept) != len(overrides)


# result-changing keys added since runs began: the value an old config.yaml without them stood for
BEFORE_THE_KEY = {"fused_loss": False}


def is_free(key: str) -> bool:
    return key in FREE_KEYS or key == "cluster" or key.startswith("cluster.")


def differs(key: str, old, new) -> bool:
    # compile=null resumes as the checkpoint was trained (its meta records `compiled`): only two explicit values
    # can disagree
    if key == "compile" and (old is None or new is None):
        return False
    return old != new


def flatten(node, prefix: str = "") -> dict:
    """Nested dicts as dotted keys; lists and scalars are leaf values."""
    flat = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def load_flat(yaml_text: str) -> dict:
    container = OmegaConf.to_container(OmegaConf.create(yaml_text), resolve=True)
    return flatten(container if isinstance(container, dict) else {})


def changed_keys(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for each result-changing key whose value differs; keys absent from `old` are ignored unless
    their absence meant a value (BEFORE_THE_KEY)."""
    old = {**BEFORE_THE_KEY, **old}
    return [(k, old[k], new[k]) for k in new if k in old and not is_free(k) and differs(k, old[k], new[k])]


def _fmt(value) -> str:
    return "null" if value is None else str(value)


def check_resume(config_path: Path, run_label: str, new_yaml: str, resume_changed: bool) -> str | None:
    """Compare the saved config.yaml (if any) with the new one. Raises UserError when result-changing keys
    differ and `resume_changed` is False; with it, returns a one-line warning (None when nothing differs)."""
    path = Path(config_path)
    if not path.is_file():
        return None
    try:
        old = load_flat(path.read_text())
    except Exception as exc:  # a damaged file: say which, in one line
        raise UserError(f"cannot read {path} ({type(exc).__name__}); fix or remove it, or use run_name=NEW") from None
    diffs = changed_keys(old, load_flat(new_yaml))
    if not diffs:
        return None
    was = ", ".join(f"{k}={_fmt(o)}" for k, o, _ in diffs)
    now = ", ".join(f"{k}={_fmt(n)}" for k, _, n in diffs)
    if not resume_changed:
        # a key the run predates: the override that resumes it as it began
        began = " ".join(f"{k}={_fmt(o).lower()}" for k, o, _ in diffs if k in BEFORE_THE_KEY and k not in old)
        raise UserError(f"run {run_label} was started with {was}; this command has {now}. "
                        + (f"Add {began} to resume it as it began (it predates the key), use" if began else "Use")
                        + " run_name=NEW for a new run, or add +resume_changed=true to resume with the new values "
                          "(safe e.g. for a longer horizon)")
    return f"warning: run {run_label} was started with {was}; resuming with {now} (+resume_changed=true)"
