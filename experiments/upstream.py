"""Run upstream nanochat's own code (a checkout of karpathy/nanochat) on our files, to compare with ours.

Upstream reads everything from $NANOCHAT_BASE_DIR: the pretraining shards from base_data_climbmix/ (sorted; the
last one is its validation split) and the tokenizer from tokenizer/ (tokenizer.pkl, token_bytes.pt, which our
tok_train writes too). `lay_out_base_dir` links our files there, and `run_upstream` runs a command in a subprocess
whose `nanochat` package is upstream's. Both sides' base_train take the same settings: upstream's flags
(`upstream_flags`) are our launcher's keys (`our_overrides`) in kebab-case. Used by
tests/fixtures/upstream/make_golden.py, experiments/compare_upstream.py and experiments/bench_vs_upstream.py.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from nanochat.common import UserError

UPSTREAM_FILES = ("nanochat/dataloader.py", "nanochat/tokenizer.py", "nanochat/engine.py",
                  "nanochat/checkpoint_manager.py", "scripts/base_train.py")
QUIET = {"eval_every": -1, "core_metric_every": -1, "sample_every": -1}  # evaluations and samples off on both sides


def check_checkout(path) -> Path:
    path = Path(path).resolve()
    missing = [name for name in UPSTREAM_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path} is not a checkout of karpathy/nanochat (no {', '.join(missing)}); clone it, or "
                        f"extract one: git archive HEAD | tar -x -C DIR")
    return path


def upstream_python(checkout: Path, given: str | None = None) -> str:
    """The interpreter for upstream's side: `given`, else the checkout's own virtual environment (DIR/.venv, where
    `uv sync` puts it), else ours (upstream's code then runs on our packages)."""
    if given:
        found = shutil.which(given)  # a path, or a name on PATH
        if not found:
            raise UserError(f"--upstream-python {given}: not an executable file")
        return found
    own = checkout / ".venv" / "bin" / "python"
    return str(own) if own.is_file() else sys.executable


def our_overrides(settings: dict, fused_loss: bool = True) -> list[str]:
    """Our launcher's overrides for base_train `settings` (its keys are upstream's flags in snake_case), on CPU;
    `fused_loss=False`: upstream's plain loss, for results equal to upstream's bit for bit."""
    return [f"{key}={value}" for key, value in {**settings, **QUIET}.items()] + [
        "device=cpu", f"fused_loss={str(fused_loss).lower()}"]


def upstream_flags(settings: dict) -> list[str]:
    """Upstream's scripts/base_train.py flags for the same `settings`, on CPU."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in {**settings, **QUIET}.items()]
    return flags + ["--device-type=cpu"]


def lay_out_base_dir(base: Path, shards: list[Path], tokenizer_dir: Path) -> Path:
    """Link `shards` (train shards then the validation shard, named so that they sort in that order) and the
    tokenizer folder into `base` as upstream expects them."""
    data = base / "base_data_climbmix"
    data.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        (data / f"shard_{i:05d}.parquet").symlink_to(Path(shard).resolve())
    (base / "tokenizer").symlink_to(Path(tokenizer_dir).resolve(), target_is_directory=True)
    return base


def python_env(pythonpath, **env) -> dict:
    """This process's environment for a one-rank child with `pythonpath` as its PYTHONPATH, plus `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONPATH")}
    return {**clean, "PYTHONPATH": str(pythonpath), **env}


def run_python(argv: list[str], *, cwd, pythonpath, python: str = sys.executable, **env) -> str:
    """`python argv...` on one rank with `pythonpath` first on the path; returns its stdout. On a failure its
    stderr is shown, then a one-line UserError."""
    proc = subprocess.run([python, *argv], cwd=cwd, capture_output=True, text=True, env=python_env(pythonpath, **env))
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise UserError(f"exit {proc.returncode} from {python} {' '.join(argv)} (in {cwd})")
    return proc.stdout


def run_upstream(checkout: Path, base: Path, argv: list[str], python: str = sys.executable, **env) -> str:
    """`python argv...` with upstream's `nanochat` package and `base` as its NANOCHAT_BASE_DIR."""
    return run_python(argv, cwd=checkout, pythonpath=checkout, python=python, NANOCHAT_BASE_DIR=str(base), **env)
