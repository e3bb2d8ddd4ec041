"""Run upstream nanochat's own code (a checkout of karpathy/nanochat) on our files, to compare with ours.

Upstream reads everything from $NANOCHAT_BASE_DIR: the pretraining shards from base_data_climbmix/ (sorted; the
last one is its validation split) and the tokenizer from tokenizer/ (tokenizer.pkl, token_bytes.pt, which our
tok_train writes too). `lay_out_base_dir` links our files there, and `run_upstream` runs a command in a subprocess
whose `nanochat` package is upstream's. Used by tests/fixtures/upstream/make_golden.py and
experiments/compare_upstream.py.
"""

import os
import subprocess
import sys
from pathlib import Path

from nanochat.common import UserError

UPSTREAM_FILES = ("nanochat/dataloader.py", "nanochat/tokenizer.py", "scripts/base_train.py")


def check_checkout(path) -> Path:
    path = Path(path).resolve()
    missing = [name for name in UPSTREAM_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path} is not a checkout of karpathy/nanochat (no {', '.join(missing)}); clone it, or "
                        f"extract one: git archive HEAD | tar -x -C DIR")
    return path


def lay_out_base_dir(base: Path, shards: list[Path], tokenizer_dir: Path) -> Path:
    """Link `shards` (train shards then the validation shard, named so that they sort in that order) and the
    tokenizer folder into `base` as upstream expects them."""
    data = base / "base_data_climbmix"
    data.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        (data / f"shard_{i:05d}.parquet").symlink_to(Path(shard).resolve())
    (base / "tokenizer").symlink_to(Path(tokenizer_dir).resolve(), target_is_directory=True)
    return base


def run_python(argv: list[str], *, cwd, pythonpath, **env) -> str:
    """`python argv...` on one rank with `pythonpath` first on the path; returns its stdout. On a failure its
    stderr is shown, then a one-line UserError."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(pythonpath), **env})
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise UserError(f"exit {proc.returncode} from python {' '.join(argv)} (in {cwd})")
    return proc.stdout


def run_upstream(checkout: Path, base: Path, argv: list[str], **env) -> str:
    """`python argv...` with upstream's `nanochat` package and `base` as its NANOCHAT_BASE_DIR."""
    return run_python(argv, cwd=checkout, pythonpath=checkout, NANOCHAT_BASE_DIR=str(base), **env)
