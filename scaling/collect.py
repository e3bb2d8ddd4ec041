"""Sweep results -> one pandas DataFrame, one row per run (or CSV row): the table every fit reads.

Columns: run, depth, params_total, params_non_embedding, params_scaling, N (the parameter count the fits use),
D (tokens), C (FLOPs), budget (the run's nominal FLOPs budget, NaN when it had none), loss (val_bpb), core,
wall_time_s, gpu_hours.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from nanochat.common import UserError
from nanochat.runs import MetricsLog, Run

N_COLUMNS = {"total": "params_total", "non_embedding": "params_non_embedding", "scaling": "params_scaling"}
COLUMNS = ["run", "depth", "params_total", "params_non_embedding", "params_scaling", "N", "D", "C", "budget",
           "loss", "core", "wall_time_s", "gpu_hours"]


def collect(inputs: list[str], n_column: str = "scaling") -> tuple[pd.DataFrame, list[str]]:
    """(table, skipped) from a CSV, or from sweep folders and run folders; `skipped` holds one
    'run: reason' line per run folder that cannot be used (base_train unfinished, no val_bpb, ...)."""
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist")
    if is_csv(inputs):
        return read_csv(paths[0]), []
    rows, skipped = [], []
    for folder in [run for path in paths for run in _run_folders(path)]:
        try:
            rows.append(_read_run(Run(folder), N_COLUMNS[n_column]))
        except _Skip as why:
            skipped.append(f"{folder.name}: {why}")
    if not rows:
        found = f"; skipped: {'; '.join(skipped)}" if skipped else ""
        raise UserError(f"no finished runs (base_train/summary.json) under {', '.join(map(str, paths)) + found}")
    return pd.DataFrame(rows, columns=COLUMNS), skipped


def is_csv(inputs: list[str]) -> bool:
    """One file (rather than folders): the CSV form of INPUT."""
    return len(inputs) == 1 and Path(inputs[0]).is_file()


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV with columns N, D, loss and optionally C (default 6 N D) and core; C doubles as the budget."""
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("N", "D", "loss") if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; a CSV needs N, D, loss (optionally C)")
    given = [c for c in ("N", "D", "loss", "C") if c in table.columns]
    values = table[given].apply(pd.to_numeric, errors="coerce")
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any().any():
        row, col = next((r, c) for c in given for r in table.index[bad[c]])
        raise UserError(f"{path}: row {row + 2} column {col} is {table.at[row, col]}; N, D, loss and C must be "
                        f"positive numbers")
    out = pd.DataFrame({"run": [f"row{i + 2}" for i in table.index], "N": values["N"], "D": values["D"],
                        "loss": values["loss"]})
    out["C"] = values["C"] if "C" in given else 6 * out["N"] * out["D"]
    out["budget"] = values["C"] if "C" in given else np.nan
    out["core"] = pd.to_numeric(table["core"], errors="coerce") if "core" in table.columns else np.nan
    return out.reindex(columns=COLUMNS)


class _Skip(Exception):
    """A run folder that cannot join the table; the reason goes to the summary."""


def _run_folders(path: Path) -> list[Path]:
    """`path` itself when it is a run folder, else the run folders inside it (a sweep folder), leaving out runs
    that never train a base model (a sweep's shared tokenizer run)."""
    def is_run(p: Path) -> bool:
        return Run(p).config_path.is_file() or Run(p).stage_dir("base_train").is_dir()

    if not path.is_dir():
        raise UserError(f"{path} is a file among several inputs: give one CSV alone, or sweep and run folders")
    if is_run(path):
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and is_run(p) and _trains(Run(p)))
    if not runs:
        raise UserError(f"{path} holds no run folders (a run folder has config.yaml or base_train/)")
    return runs


def _trains(run: Run) -> bool:
    if run.stage_dir("base_train").is_dir() or not run.config_path.is_file():
        return True
    try:
        stages = (yaml.safe_load(run.config_path.read_text()) or {}).get("stages")
    except (yaml.YAMLError, AttributeError):
        return True  # _read_run says what is wrong with it
    return not isinstance(stages, list) or "base_train" in stages


def _read_run(run: Run, n_key: str) -> dict:
    if not run.stage_dir("base_train").is_dir():
        raise _Skip("no base_train stage")
    if not run.is_done("base_train"):
        raise _Skip("base_train unfinished (no summary.json)")
    try:
        train = run.read_summary("base_train")
        evaluation = run.read_summary("base_eval") if run.is_done("base_eval") else {}
        config = yaml.safe_load(run.config_path.read_text()) if run.config_path.is_file() else None
    except (ValueError, yaml.YAMLError) as exc:
        raise _Skip(f"unreadable summary or config ({str(exc).splitlines()[0]})") from None
    log = _metrics(run)
    config = config if isinstance(config, dict) else {}
    row = {"run": run.root.name, "depth": train.get("depth"), **{k: _number(train.get(k)) for k in N_COLUMNS.values()},
           "D": _number(train.get("tokens")), "C": _number(train.get("flops")), "budget": _budget(config),
           # val_bpb: base_train's final evaluation, else base_eval's, else the last one logged
           "loss": _first(train.get("val_bpb"), evaluation.get("val_bpb"), *_logged(log, "val_bpb")),
           # CORE: base_eval's ("n/a (not staged)" counts as missing), else the last one base_train logged
           "core": _first(evaluation.get("core_metric"), *_logged(log, "core_metric")),
           "wall_time_s": _number(train.get("wall_time_s")), "gpu_hours": _number(train.get("gpu_hours"))}
    row["N"] = row[n_key]
    for key, name in (("N", n_key), ("D", "tokens"), ("C", "flops"), ("loss", "val_bpb")):
        if not row[key] > 0:
            raise _Skip(f"no positive {name} in its summaries")
    return row


def _budget(config: dict) -> float:
    """target_flops when it set the horizon: upstream's precedence puts num_iterations first."""
    target, iterations = _number(config.get("target_flops")), _number(config.get("num_iterations"))
    return target if target > 0 and not iterations > 0 else math.nan


def _metrics(run: Run) -> list[dict]:
    path = run.stage_dir("base_train") / "metrics.jsonl"
    try:
        return MetricsLog(path).read()
    except ValueError:  # a line torn by a kill: the summaries still hold the final figures
        return []


def _logged(rows: list[dict], key: str) -> list:
    return [row[key] for row in reversed(rows) if key in row]


def _number(value) -> float:
    """A finite float, or NaN for anything else (None, "n/a (not staged)", "off", a bool)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


def _first(*values) -> float:
    return next((_number(v) for v in values if not math.isnan(_number(v))), math.nan)
