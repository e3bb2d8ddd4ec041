"""The report card: <run>/report.md, rebuilt from the run folder alone (config.yaml, each stage's summary.json
and metrics.jsonl), so it can be regenerated at any time, on any machine, without the model:

    python -m nanochat.report [RUN_FOLDER_OR_NAME] [--gpu-hour-price 3.0]

Sections: nanochat's summary table (CORE, ChatCORE and the chat tasks by stage, as upstream's report ends
with), loss and bpb plots (PNGs in <run>/report/), wall time and cost, the system, then every stage's figures.
"""

import argparse
import importlib.metadata
import io
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from nanochat.common import UserError, atomic_write_bytes, atomic_write_text, run_cli
from nanochat.config import Config
from nanochat.runs import Run, find_run, read_jsonl, resolve_runs_root
from nanochat.stage_table import STAGES
from nanochat.scheduler import SlurmJob

FIXTURE_LABEL = "embedded fixture, not comparable to published numbers"
# (row, summary key); columns are (header, stage whose summary fills them), as upstream's BASE/MID/SFT/RL
TABLE_ROWS = [("CORE", "core_metric"), ("ARC-Easy", "ARC-Easy"), ("ARC-Challenge", "ARC-Challenge"),
              ("MMLU", "MMLU"), ("GSM8K", "GSM8K"), ("HumanEval", "HumanEval"), ("SpellingBee", "SpellingBee"),
              ("ChatCORE", "chatcore")]
TABLE_COLUMNS = [("BASE", "base_eval"), ("MID", "mid_train"), ("SFT", "chat_eval_sft"), ("RL", "chat_eval_rl")]
PACKAGES = ["nanochat-slurm", "torch", "numpy", "tiktoken", "pyarrow", "rustbpe", "hydra-core", "submitit",
            "matplotlib"]


def write_report(run: Run, *, gpu_hour_price: float) -> Path:
    """Write <run>/report.md (and its PNGs in <run>/report/) from whatever the run folder holds; returns its path."""
    config = _read_config(run)
    summaries = {s: run.read_summary(s) for s in STAGES if run.is_done(s)}
    plots = plot_curves({s: read_jsonl(run.stage_dir(s) / "metrics.jsonl") for s in STAGES}, run.root / "report")
    fixture = config.get("dataset") == "embedded" or any(s.get("task_data") == "fixture" for s in summaries.values())
    lines = [f"# nanochat report: {run.root.name}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from `{run.root}`; rebuild with "
             f"`python -m nanochat.report {run.root}`.", "", "## Summary", ""]
    if fixture:
        lines += [f"**{FIXTURE_LABEL}**", ""]
    if "core_metric_note" in summaries.get("base_eval", {}):
        lines += [f"CORE: {summaries['base_eval']['core_metric_note']}.", ""]
    rows = [[name] + [_fmt(summaries.get(stage, {}).get(key)) for _, stage in TABLE_COLUMNS]
            for name, key in TABLE_ROWS]
    lines += _table(["Metric"] + [header for header, _ in TABLE_COLUMNS], rows) + [""]
    lines += ["## Plots", ""] + [f"![{name}]({path.relative_to(run.root).as_posix()})" for name, path in plots.items()]
    lines += [] if plots else ["No training curves logged yet."]
    lines += ["", f"## Wall time and cost (at ${gpu_hour_price:.2f} per GPU-hour)", ""]
    lines += _cost_table(summaries, gpu_hour_price) + ["", "## System", ""] + _system(run, config, summaries)
    lines += ["", "## Stages"]
    for stage in STAGES:
        lines += ["", f"### {stage}", ""] + _stage_section(run, stage, summaries.get(stage))
    atomic_write_text(run.report_path, "\n".join(lines) + "\n")
    return run.report_path


def plot_curves(metrics: dict[str, list[dict]], out_dir: Path) -> dict[str, Path]:
    """loss.png (each training stage's loss, raw and smoothed, with its validation bpb on the right-hand axis) and
    rl.png (reward, pass@1); only those with data, others removed so a stale plot is never linked.
    Returns {title: path}."""
    figures = {"training loss and validation bpb": ("loss.png", [(s, "loss", "val_bpb")
                                                                for s in ("base_train", "mid_train", "sft")]),
               "RL reward": ("rl.png", [("rl", "reward", None), ("rl", "pass@1", None)])}
    written = {}
    for title, (name, series) in figures.items():
        panels = []
        for stage, key, val_key in series:
            rows = metrics.get(stage, [])
            xlabel, points = _points(rows, key)
            if points:  # validation on the same x axis as the loss (tokens, or steps)
                validation = _points(rows, val_key, xlabel)[1] if val_key else []
                panels.append((stage, key, xlabel, points, val_key, validation))
        path = out_dir / name
        if not panels:
            path.unlink(missing_ok=True)
            continue
        from matplotlib.figure import Figure  # the object API, not pyplot: no process-wide backend switch

        # 7 x 4.5 inches at 150 dpi: ~1000 px a panel, readable on a report page
        fig = Figure(figsize=(7 * len(panels), 4.5), layout="constrained")
        for i, (stage, key, xlabel, points, val_key, validation) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            xs, ys = [x for x, _ in points], [y for _, y in points]
            few = len(points) < 30
            ax.plot(xs, ys, marker="." if few else None, alpha=1.0 if few else 0.3, lw=1, label=key)
            if not few:
                ax.plot(xs, _smoothed(ys), lw=2, color="C0", label=f"{key} (EMA 0.9)")
            ax.set(title=f"{stage}: {key}", xlabel=xlabel, ylabel=key)
            ax.grid(alpha=0.3)
            handles = ax.get_legend_handles_labels()
            if validation:
                right = ax.twinx()
                right.plot([x for x, _ in validation], [y for _, y in validation], "o-", color="C3", ms=4,
                           label=f"validation {val_key.removeprefix('val_')}")
                right.set_ylabel(val_key)
                handles = [a + b for a, b in zip(handles, right.get_legend_handles_labels())]
            ax.legend(*handles, fontsize=8, loc="upper right")
            if xlabel == "tokens":
                ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 4))  # 6e5, not 600000
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=150)
        atomic_write_bytes(path, buffer.getvalue())  # a report being read never links half a PNG
        written[title] = path
    return written


def _smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """Debiased exponential moving average, as upstream's training log smooths its loss."""
    out, ema = [], 0.0
    for i, value in enumerate(values):
        ema = beta * ema + (1 - beta) * value
        out.append(ema / (1 - beta ** (i + 1)))
    return out


def _points(rows: list[dict], key: str, x: str | None = None) -> tuple[str, list]:
    """(x label, [(x, y)]) over rows with a finite `key`; x is tokens when every such row has them (comparable
    across batch sizes), else the step, unless `x` says which."""
    rows = [r for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
    tokens = [r.get("tokens") for r in rows]
    x = x or ("tokens" if all(isinstance(t, (int, float)) for t in tokens) and any(tokens) else "step")
    return x, [(r[x], r[key]) for r in rows if isinstance(r.get(x), (int, float))]


def _read_config(run: Run) -> dict:
    if not run.config_path.is_file():
        return {}
    import yaml

    return yaml.safe_load(run.config_path.read_text()) or {}


def _cost_table(summaries: dict, price: float) -> list[str]:
    rows, total_wall, total_hours, gpu_seen = [], 0.0, 0.0, False
    for stage, s in summaries.items():
        wall = s.get("wall_time_s", s.get("train_time_s"))
        hours, cpu = s.get("gpu_hours"), s.get("gpu_type") == "cpu"
        total_wall += wall or 0.0
        total_hours += hours or 0.0
        gpu_seen |= isinstance(hours, (int, float)) and not cpu
        cost = "$0.00 (CPU)" if cpu else f"${hours * price:,.2f}" if isinstance(hours, (int, float)) else "-"
        rows.append([stage, _duration(wall), _gpus(s), _fmt(hours), cost])
    total_cost = f"${total_hours * price:,.2f}" if gpu_seen else "$0.00 (CPU)" if summaries else "-"
    rows.append(["**total**", _duration(total_wall), "", _fmt(total_hours), total_cost])
    return _table(["Stage", "Wall time", "GPUs", "GPU-hours", "Cost"], rows) + [
        "", "Totals add the stages that record them; \"-\": the stage's summary has no such figure."]


def _system(run: Run, config: dict, summaries: dict) -> list[str]:
    gpus = sorted({_gpus(s) for s in summaries.values() if s.get("gpu_type")})
    nodes = max((s["nodes"] for s in summaries.values() if isinstance(s.get("nodes"), int)), default=None)
    # the launcher records every job it submits for this run; the job writing this report may be one of them
    record = run.jobs()
    jobs = [f"{job.get('job_id')} ({', '.join(job.get('stages', []))})" for job in record]
    this_job = SlurmJob.from_env()
    if this_job.job_id and this_job.job_id not in {str(j.get("job_id")) for j in record}:
        jobs.append(f"{this_job.job_id} (this job)")
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    return [f"- Run: experiment {config.get('experiment_name', '-')}, dataset {config.get('dataset', '-')}, "
            f"depth {config.get('depth', '-')}",
            f"- Git commit (of the code writing this report): {_git()}",
            f"- GPUs: {', '.join(gpus) or '-'}",
            f"- Nodes: {nodes or this_job.num_nodes or 'not recorded'}",
            f"- Slurm jobs: {', '.join(jobs) or 'none'}",
            f"- Python {platform.python_version()} on {platform.platform()}",
            f"- Packages: {', '.join(versions)}"]


def _git() -> str:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():  # an installed wheel: there is no commit to name
        return "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{commit} ({'dirty' if status.strip() else 'clean'})" if commit else "unknown"


def _stage_section(run: Run, stage: str, summary: dict | None) -> list[str]:
    if summary is None:
        return ["started, not finished" if run.stage_dir(stage).is_dir() else "not run"]
    lines, tables = [], []
    summary = dict(summary)
    if isinstance(summary.get("results"), dict):  # CORE: one row per task, accuracy beside its centered score
        results, centered = summary.pop("results"), summary.pop("centered_results", {}) or {}
        tables += [_table(["Task", "Accuracy", "Centered"],
                          [[t, _fmt(a), _fmt(centered.get(t))] for t, a in results.items()])]
    for key, value in summary.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            columns = list(dict.fromkeys(k for v in value.values() for k in v))
            tables += [_table([key] + columns, [[n] + [_fmt(v.get(c)) for c in columns] for n, v in value.items()])]
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value) and (
                key == "samples" or any("\n" in v for v in value)):
            fence = "`" * max([3] + [len(r) + 1 for v in value for r in re.findall("`+", v)])  # outlasts any inside
            tables += [[f"{key}:", "", fence + "text"] + [json.dumps(v, ensure_ascii=False) for v in value] + [fence]]
        else:
            lines.append(f"- {key}: {_fmt(value)}")
    return lines + [line for table in tables for line in [""] + table]


def _gpus(summary: dict) -> str:
    gpu = summary.get("gpu_type")
    return "" if not gpu else "CPU" if gpu == "cpu" else f"{summary.get('world_size', 1)} × {gpu}"


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "none"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return f"{value:.3e}" if value and not 1e-3 <= abs(value) < 1e6 else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table padded to aligned columns, so the raw file reads as well as the rendered one."""
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return lines[:1] + ["|" + "|".join("-" * (w + 2) for w in widths) + "|"] + lines[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.report", description="Rebuild a run's report.md.")
    parser.add_argument("run", nargs="?", help="run folder or run name (default: the newest run under runs_root)")
    parser.add_argument("--gpu-hour-price", type=float, default=None,
                        help=f"$ per GPU-hour (default: the run's gpu_hour_price, else {Config.gpu_hour_price})")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(_rebuild(args.run, args.gpu_hour_price)))


def _rebuild(name: str | None, price: float | None) -> Path:
    run = find_run(name)
    if run is None:
        raise UserError(f"no runs under {resolve_runs_root()}")
    if not run.config_path.is_file():
        raise UserError(f"no run folder (with a config.yaml) at {run.root}")
    if price is None:
        price = _read_config(run).get("gpu_hour_price")
        price = Config.gpu_hour_price if price is None else float(price)
    if price < 0:
        raise UserError(f"--gpu-hour-price must be >= 0, got {price}")
    return write_report(run, gpu_hour_price=price)


if __name__ == "__main__":
    sys.exit(main())
