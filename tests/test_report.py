import json
import re
import subprocess
import sys

import pytest

from nanochat.report import FIXTURE_LABEL, main, write_report
from nanochat.runs import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table(text: str, first_header: str) -> dict[str, list[str]]:
    """The markdown table whose header starts with `first_header`, as {first cell: [other cells]} (header too)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\|\s*{re.escape(first_header)}\s*\|", line))
    rows = {}
    for line in [lines[start]] + lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def make_run(tmp_path, dataset="embedded") -> Run:
    run = Run(tmp_path / "runs" / "embedded-d4")
    run.root.mkdir(parents=True)
    run.config_path.write_text(f"experiment_name: embedded\ndataset: {dataset}\ndepth: 4\n")
    return run


def log(run, stage, rows, torn_tail=False):
    path = run.stage_dir(stage) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + ('{"step": 99, "lo' if torn_tail else ""))  # a kill mid-line must not break the report


@pytest.fixture
def full_run(tmp_path):
    run = make_run(tmp_path)
    run.write_summary("tok_train", {"vocab_size": 8192, "train_time_s": 12.5, "dataset": "embedded"})
    run.write_summary("base_train", {
        "step": 150, "loss": 3.21, "val_bpb": 1.234, "tokens": 614400, "flops": 1.5e15, "wall_time_s": 3725.0,
        "world_size": 8, "gpu_type": "NVIDIA H100 80GB HBM3", "gpu_hours": 2.0, "nodes": 2, "requeues": 1,
        "weights_sha256": "ab" * 32})
    log(run, "base_train", [{"step": s, "loss": 5.0 - s / 100, "tokens": 4096 * s, "dt": 0.1} for s in range(1, 151)]
        + [{"step": s, "val_bpb": 2.0 - s / 300, "tokens": 4096 * s} for s in (0, 50, 100, 150)], torn_tail=True)
    run.write_summary("base_eval", {"val_bpb": 1.2345, "core_metric": 0.1234,
                                    "results": {"hellaswag": 0.31, "arc_easy": 0.45},
                                    "centered_results": {"hellaswag": 0.08, "arc_easy": 0.27},
                                    "samples": ["The capital of France is Paris", "Line one\nline ```two```"]})
    run.write_summary("sft", {"step": 40, "loss": 1.9, "wall_time_s": 600.0, "world_size": 8,
                              "gpu_type": "NVIDIA H100 80GB HBM3", "gpu_hours": 0.5})
    log(run, "sft", [{"step": s, "loss": 2.5 - s / 100} for s in range(1, 41)])
    run.write_summary("chat_eval_sft", {"ARC-Easy": 0.5123, "ARC-Challenge": 0.3, "GSM8K": 0.0312, "chatcore": 0.21,
                                        "task_data": "fixture", "assistant_end_rate": 1.0, "gpu_hours": 0.25,
                                        "gpu_type": "NVIDIA H100 80GB HBM3", "world_size": 8, "wall_time_s": 112.0})
    run.write_summary("chat_eval_rl", {"GSM8K": 0.0456, "task_data": "fixture"})
    (run.stage_dir("rl")).mkdir()  # started, never finished
    (run.root / "slurm").mkdir()
    (run.root / "slurm" / "jobs.jsonl").write_text('{"job_id": "77", "stages": ["base_train", "sft"]}\n')
    return run


def test_report_table_cost_plots_and_stages(full_run, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    path = write_report(full_run, gpu_hour_price=3.0)
    assert path == full_run.root / "report.md"
    text = path.read_text()

    summary = table(text, "Metric")
    assert summary["Metric"] == ["BASE", "MID", "SFT", "RL"]
    assert summary["CORE"] == ["0.1234", "-", "-", "-"]
    assert summary["ARC-Easy"] == ["-", "-", "0.5123", "-"]
    assert summary["GSM8K"] == ["-", "-", "0.0312", "0.0456"]
    assert summary["ChatCORE"] == ["-", "-", "0.2100", "-"]
    assert summary["MMLU"] == summary["HumanEval"] == summary["SpellingBee"] == ["-"] * 4
    assert FIXTURE_LABEL in text

    cost = table(text, "Stage")
    assert cost["base_train"] == ["1h02m05s", "8 × NVIDIA H100 80GB HBM3", "2.0000", "$6.00"]
    assert cost["sft"][-1] == "$1.50" and cost["chat_eval_sft"][-1] == "$0.75"
    assert cost["tok_train"][0] == "12.5s" and cost["base_eval"][-1] == "-"
    assert cost["**total**"][2:] == ["2.7500", "$8.25"]

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["report/loss.png"]  # validation bpb drawn over the loss; no RL metrics were logged: no rl.png
    for link in links:
        assert (full_run.root / link).read_bytes()[:8] == PNG_MAGIC
    assert not (full_run.root / "report" / "rl.png").exists()

    assert "- Slurm jobs: 77 (base_train, sft), 78 (this job)" in text
    assert "- Nodes: 2" in text and "8 × NVIDIA H100 80GB HBM3" in text and "torch " in text
    assert re.search(r"- Git commit \(.*\): (unknown|[0-9a-f]{4,} \((dirty|clean)\))", text)
    sections = dict(re.findall(r"### (\w+)\n\n(.*)", text))
    assert sections["mid_train"] == "not run" and sections["chat_eval_rl"] == "- GSM8K: 0.0456"
    assert sections["rl"] == "started, not finished"
    assert "| hellaswag | 0.3100   | 0.0800   |" in text  # CORE per task, accuracy beside centered
    assert '"Line one\\nline ```two```"' in text and "\n````text\n" in text  # the fence outlasts backticks inside
    assert "- weights_sha256: " + "ab" * 32 in text and "- requeues: 1" in text


def test_cpu_run_costs_nothing_and_core_text_is_kept(tmp_path):
    run = make_run(tmp_path, dataset="climbmix")
    run.write_summary("base_train", {"step": 3, "wall_time_s": 30.0, "world_size": 1, "gpu_type": "cpu",
                                     "gpu_hours": 0.0})
    run.write_summary("base_eval", {"val_bpb": 2.5, "core_metric": "n/a (not staged)"})
    log(run, "rl", [{"step": s, "reward": s / 10, "loss": float("nan")} for s in range(5)])  # NaN: not plotted
    text = write_report(run, gpu_hour_price=3.0).read_text()
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text) == ["report/rl.png"]
    assert (run.root / "report" / "rl.png").read_bytes()[:8] == PNG_MAGIC
    assert table(text, "Metric")["CORE"] == ["n/a (not staged)", "-", "-", "-"]
    cost = table(text, "Stage")
    assert cost["base_train"][-1] == "$0.00 (CPU)" and cost["**total**"][-1] == "$0.00 (CPU)"
    assert FIXTURE_LABEL not in text
    run.write_summary("chat_eval_sft", {"MMLU": 0.25, "task_data": "fixture"})  # fixture tasks on real pretraining
    assert FIXTURE_LABEL in write_report(run, gpu_hour_price=3.0).read_text()


def test_empty_run_still_gets_a_report(tmp_path):
    run = make_run(tmp_path, dataset="climbmix")
    (run.root / "report").mkdir()
    (run.root / "report" / "loss.png").write_bytes(PNG_MAGIC)  # from an earlier report: must not linger
    text = write_report(run, gpu_hour_price=3.0).read_text()
    assert all(cells == ["-"] * 4 for name, cells in table(text, "Metric").items() if name != "Metric")
    assert text.count("\nnot run\n") == 9 and "![" not in text
    assert not (run.root / "report" / "loss.png").exists()


def test_cli_regenerates_newest_run_with_price(full_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # runs_root = tmp_path/runs, where full_run lives
    assert main(["--gpu-hour-price", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(full_run.report_path)
    assert table(full_run.report_path.read_text(), "Stage")["base_train"][-1] == "$4.00"
    full_run.config_path.write_text(full_run.config_path.read_text() + "gpu_hour_price: 1.5\n")
    assert main([full_run.root.name]) == 0  # a run name is looked up under runs_root; price from config.yaml
    assert table(full_run.report_path.read_text(), "Stage")["base_train"][-1] == "$3.00"


def test_cli_on_a_missing_run_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanochat.report", str(tmp_path / "nope")], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: no run folder") and result.stderr.count("\n") == 1
