"""python -m experiments.bench vs-upstream: user mistakes are one line, peak RSS is each run's own, upstream's log
is read as upstream writes it, and (where a checkout of karpathy/nanochat is at hand) a CPU-sized run end to end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import bench
from experiments.bench_vs_upstream import run_measured, upstream_tok_per_sec
from experiments.upstream import UPSTREAM_FILES
from nanochat.common import UserError

REPO = Path(__file__).resolve().parent.parent
FIXTURE_TOKENIZER = REPO / "tests" / "fixtures" / "upstream" / "tokenizer"  # 512 tokens, upstream's files too
# a checkout to run against: NANOCHAT_UPSTREAM when set (then it must be one), else /tmp/upstream if it is there
UPSTREAM = os.environ.get("NANOCHAT_UPSTREAM", "/tmp/upstream")
TINY = ["--repeats", "1", "--depth", "2", "--max-seq-len", "64", "--device-batch-size", "2", "--total-batch-size",
        "256", "--steps", "4", "--tokenizer", str(FIXTURE_TOKENIZER), "--no-compile", "--decode-prompt", "8",
        "--decode-tokens", "8"]


def vs_upstream(*flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.bench", "vs-upstream", *flags], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=900)


def fake_checkout(folder: Path) -> Path:
    """Upstream's files by name only: enough for the checks made before anything runs."""
    for name in UPSTREAM_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--upstream", "{tmp}"], "is not a checkout of karpathy/nanochat (no nanochat/dataloader.py"),
    (["--upstream", "{fake}", "--upstream-python", "{tmp}/nope"], "/nope: not an executable file"),
    (["--upstream", "{fake}", "--total-batch-size", "1000"], "must be a multiple of --device-batch-size x"),
    (["--upstream", "{fake}", "--window-pattern", "SLX"], "letters S and L only"),
    (["--upstream", "{fake}", "--decode-batch", "1,x"], "--decode-batch '1,x': give positive whole numbers"),
    (["--upstream", "{fake}", "--tokenizer", "{tmp}"], "no tokenizer.pkl, token_bytes.pt"),
])
def test_user_mistakes_are_one_line_exit_2(tmp_path, capsys, flags, message):
    fake = fake_checkout(tmp_path / "fake")
    assert bench.main(["vs-upstream", *[flag.format(tmp=tmp_path, fake=fake) for flag in flags]]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # checked before anything runs
    [line] = err.splitlines()
    assert line.startswith("error: ") and message in line


def test_peak_rss_is_each_runs_own(tmp_path):
    """A run that holds 300 MB, then one that holds little: the second reports its own peak, not the first's."""
    big, small = ("b = b'x' * (300 * 2**20); print('ok')", "print('ok')")  # written: resident
    measured = [run_measured(["-c", code], python=sys.executable, cwd=tmp_path, pythonpath=tmp_path,
                             log=tmp_path / "log") for code in (big, small)]
    assert measured[0].peak_rss > 300 * 2**20 > 3 * measured[1].peak_rss
    assert all(m.wall_s > 0 for m in measured) and (tmp_path / "log").read_text().strip() == "ok"


def test_a_failed_run_shows_its_last_lines_then_one_line(tmp_path, capsys):
    from nanochat.common import UserError

    with pytest.raises(UserError, match="exit 3 from .*its last lines above"):
        run_measured(["-c", "print('the cause'); raise SystemExit(3)"], python=sys.executable, cwd=tmp_path,
                     pythonpath=tmp_path, log=tmp_path / "log")
    assert "the cause" in capsys.readouterr().err


def test_upstream_tok_per_sec_from_its_step_lines():
    steps = [f"step {s:05d}/00003 ({100 * s / 3:.2f}%) | loss: 6.2 | lrm: 0.03 | dt: 1.00ms | tok/sec: {rate} | "
             f"bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 0 | total time: 0.00m"
             for s, rate in enumerate(["1,234", "987", "12,345"])]
    log = "\n".join(["Vocab size: 512", *steps, "Peak memory usage: 0.00MiB"])
    assert upstream_tok_per_sec(log, 3) == [1234.0, 987.0, 12345.0]
    with pytest.raises(UserError, match="has 3 step lines with tok/sec, not 4: has its format changed"):
        upstream_tok_per_sec(log, 4)


@pytest.mark.slow
def test_against_upstream_cpu_sized():
    """Both sides train, then decode the same exported weights to the same greedy tokens. The checkout is
    NANOCHAT_UPSTREAM, or /tmp/upstream; without either the test is skipped (CI has no copy of upstream)."""
    if "NANOCHAT_UPSTREAM" not in os.environ and not (Path(UPSTREAM) / "scripts" / "base_train.py").is_file():
        pytest.skip("no checkout of karpathy/nanochat at /tmp/upstream; set NANOCHAT_UPSTREAM=DIR to run against one")
    result = vs_upstream("--upstream", UPSTREAM, *TINY)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| upstream | 1 |" in out and "| ours | 1 |" in out and "tok/s (median of the last 2 of 4 steps)" in out
    assert "ours/upstream: tok/s " in out and ", peak RSS " in out
    for batch in (1, 8):
        assert f"batch {batch}: ours/upstream decode tok/s " in out
        assert f"batch {batch}:" in out and out.split(f"batch {batch}:")[1].splitlines()[0].endswith(
            "; the same greedy tokens")
