"""`python -m experiments.bench vs-upstream --upstream DIR`: upstream nanochat's own scripts/base_train.py against
our base_train on the same config, corpus, tokenizer and dtype, then upstream's Engine against ours on the same
weights; tok/s, peak RSS and the ratio ours/upstream. CPU only.

DIR is a checkout of karpathy/nanochat. Its side runs in --upstream-python: by default DIR/.venv/bin/python (what
`uv sync --extra cpu` there makes), else our interpreter with DIR first on the path; the header says which
interpreter and torch each side ran. Both sides get NANOCHAT_DTYPE=--dtype (both read it).

Training: a tokenizer of --vocab-size is trained on the corpus by our tok_train (or --tokenizer DIR is taken as
it is), then the runs alternate upstream, ours, upstream, ours, ... (--repeats each), so that a drift in the
machine's load falls on both sides. Upstream's base_train reads the corpus's shards and the tokenizer laid out in
a NANOCHAT_BASE_DIR of its own (experiments/upstream.py); ours runs `python -m experiments.launch
stages=[base_train]` on the same shards and tokenizer folder. Evaluations, CORE and samples are off on both.
- compile on (the default): upstream compiles as it always does (its model, and its optimizer's fused steps);
  ours runs with compile=true (the model and its optimizer's updates). Off: TORCHDYNAMO_DISABLE=1 for
  upstream, compile=false for ours.
- tok/s: each side's own per-step figure (tokens of the step over its wall time: upstream's `tok/sec:` log line,
  our metrics.jsonl `tok_per_sec`), the median over the last half of the steps: past compilation and warm-up.
- peak RSS: the kernel's high-water mark of the run's resident memory (ru_maxrss: no sampling to miss a peak),
  read by a small go-between process whose only child is the run (run_measured says why), so it is this run's
  alone. It is the largest single process of the run: both sides train in one process here (our launcher runs
  the stage in its own process at nproc=1), so it is the training process's peak.
- wall: the run's process from start to exit (imports, compilation, the final checkpoint included).

Decode: our last run's final checkpoint, exported in upstream's layout (nanochat.model_io), is loaded by each
side's own loader and timed by experiments.decode_timing with each side's Engine at each --decode-batch (greedy,
a fixed prompt), alternating likewise; the table says whether both sides generated the same tokens.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.bench_infer import markdown_table, positive_ints
from experiments.upstream import (check_checkout, lay_out_base_dir, our_overrides, python_env, run_python,
                                  upstream_flags, upstream_python)
from nanochat.common import UserError
from nanochat.dataset import split_files
from nanochat.model_io import export_upstream
from nanochat.runs import read_jsonl

REPO = Path(__file__).resolve().parent.parent
UPSTREAM_STEP_LINE = re.compile(r"^step \d+/\d+ .*\| tok/sec: ([\d,]+)", re.MULTILINE)  # upstream's per-step log


@dataclass
class Measured:
    wall_s: float
    peak_rss: int  # bytes


# Runs a command as its only child and writes the child's peak RSS (RUSAGE_CHILDREN: the largest of that child and
# the children it waited for) to argv[1]. Why a go-between: Linux starts a process's peak at the resident size of
# the process it was forked from (exec keeps the old image's high-water mark), so a direct child of this process,
# which has torch loaded, would report at least this process's ~0.3 GB; the go-between's own ~10 MB is the floor.
PEAK_RSS_OF_CHILD = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
                     "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
                     "sys.exit(rc)")


def run_measured(argv: list[str], *, python: str, cwd, pythonpath, log: Path, **env) -> Measured:
    """`python argv...` with its output in `log`: its wall time and peak RSS (see the module docstring). On a
    failure the log's last lines are shown, then a one-line UserError."""
    peak = log.with_suffix(".peak")
    with open(log, "w") as out:
        start = time.perf_counter()
        # -I: the go-between ignores PYTHONPATH (meant for the run) and imports only the standard library
        rc = subprocess.call([sys.executable, "-I", "-c", PEAK_RSS_OF_CHILD, str(peak), python, *argv], cwd=cwd,
                             stdout=out, stderr=subprocess.STDOUT, env=python_env(pythonpath, **env))
        wall = time.perf_counter() - start
    if rc != 0:
        print("\n".join(log.read_text().splitlines()[-40:]), file=sys.stderr)
        raise UserError(f"exit {rc} from {python} {' '.join(argv)} (in {cwd}); its last lines above")
    return Measured(wall, int(peak.read_text()) * (1 if sys.platform == "darwin" else 1024))  # Linux counts KiB


@dataclass
class TrainRun:
    side: str
    index: int
    tok_per_sec: list[float]  # per step
    measured: Measured

    @property
    def steady_tok_per_sec(self) -> float:
        return statistics.median(self.tok_per_sec[len(self.tok_per_sec) // 2:])


def upstream_tok_per_sec(log_text: str, steps: int) -> list[float]:
    rates = [float(rate.replace(",", "")) for rate in UPSTREAM_STEP_LINE.findall(log_text)]
    if len(rates) != steps:
        raise UserError(f"upstream's log has {len(rates)} step lines with tok/sec, not {steps}: has its format "
                           f"changed? (expected like 'step 00003/00012 (25.00%) | ... | tok/sec: 1,234 | ...')")
    return rates


def our_tok_per_sec(stage_dir: Path, steps: int) -> list[float]:
    rows = sorted((row for row in read_jsonl(stage_dir / "metrics.jsonl") if "tok_per_sec" in row),
                  key=lambda row: row["step"])
    if len(rows) != steps:
        raise UserError(f"{stage_dir}/metrics.jsonl has {len(rows)} training rows, not {steps}")
    return [row["tok_per_sec"] for row in rows]


@dataclass
class Sides:
    """Where and how each side runs, and what both read."""
    checkout: Path
    upstream_python: str
    base: Path  # upstream's NANOCHAT_BASE_DIR: our shards and tokenizer, linked
    tokenizer: Path
    dataset: str
    work: Path
    dtype: str

    def upstream(self, argv: list[str], log: Path, pythonpath=None, **env) -> Measured:
        return run_measured(argv, python=self.upstream_python, cwd=self.checkout, log=log,
                            pythonpath=pythonpath or self.checkout, NANOCHAT_BASE_DIR=str(self.base),
                            NANOCHAT_DTYPE=self.dtype, **env)

    def ours(self, argv: list[str], log: Path) -> Measured:
        return run_measured(argv, python=sys.executable, cwd=REPO, pythonpath=REPO, log=log, NANOCHAT_DTYPE=self.dtype)


def train_upstream(sides: Sides, settings: dict, compile_: bool, index: int, log: Path) -> TrainRun:
    measured = sides.upstream(["-m", "scripts.base_train", *upstream_flags(settings)], log,
                              **({} if compile_ else {"TORCHDYNAMO_DISABLE": "1"}))
    return TrainRun("upstream", index, upstream_tok_per_sec(log.read_text(), settings["num_iterations"]), measured)


def train_ours(sides: Sides, settings: dict, compile_: bool, index: int, log: Path) -> TrainRun:
    runs = sides.work / "runs"
    measured = sides.ours(["-m", "experiments.launch", f"runs_root={runs}", f"run_name=ours-{index}",
                           "stages=[base_train]", f"dataset={sides.dataset}", f"tokenizer={sides.tokenizer}",
                           *our_overrides(settings), f"compile={str(compile_).lower()}"], log)
    return TrainRun("ours", index, our_tok_per_sec(runs / f"ours-{index}" / "base_train", settings["num_iterations"]),
                    measured)


@dataclass
class DecodeRun:
    side: str
    index: int
    rows: list[dict]  # per batch size: batch, decode_tok_per_sec, tokens (the first row's)
    measured: Measured


def decode(sides: Sides, side: str, checkpoint: Path, index: int, batches: list[int], prompt: int,
           tokens: int) -> DecodeRun:
    out = sides.work / f"{side}-decode-{index}.json"
    argv = ["-m", "experiments.decode_timing", side, str(checkpoint), str(out), "--batch", ",".join(map(str, batches)),
            "--prompt", str(prompt), "--tokens", str(tokens)]
    log = sides.work / f"{side}-decode-{index}.log"
    measured = (sides.upstream(argv, log, pythonpath=f"{sides.checkout}{os.pathsep}{REPO}") if side == "upstream"
                else sides.ours(argv, log))
    return DecodeRun(side, index, json.loads(out.read_text())["rows"], measured)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def side_of(runs: list, side: str) -> list:
    return [r for r in runs if r.side == side]


def ratio_of(runs: list, value) -> str:
    """The median of `value(run)` over our runs over its median over upstream's."""
    ours, theirs = ([value(r) for r in side_of(runs, side)] for side in ("ours", "upstream"))
    return f"{statistics.median(ours) / statistics.median(theirs):.2f}x"


def training_table(runs: list[TrainRun], steps: int) -> str:
    header = ["side", "run", f"tok/s (median of the last {steps - steps // 2} of {steps} steps)", "peak RSS GiB",
              "wall s"]
    return markdown_table(header, [[r.side, str(r.index), f"{r.steady_tok_per_sec:,.0f}", gib(r.measured.peak_rss),
                                    f"{r.measured.wall_s:.0f}"] for r in runs])


def decode_table(runs: list[DecodeRun]) -> str:
    return markdown_table(["side", "run", "batch", "decode tok/s", "peak RSS GiB"],
                          [[r.side, str(r.index), str(row["batch"]), f"{row['decode_tok_per_sec']:,.1f}",
                            gib(r.measured.peak_rss)] for r in runs for row in r.rows])


def interpreter_line(side: str, python: str, pythonpath) -> str:
    probe = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                           env=python_env(pythonpath))
    if probe.returncode != 0:
        raise UserError(f"{python} cannot import torch: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    return f"{side}: {python}, torch {probe.stdout.strip()}"


def checkout_line(checkout: Path) -> str:
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True)
    return f"{checkout}" + (f" at {commit.stdout.strip()}" if commit.returncode == 0 else " (not a git repository)")


def tokenizer_for(args, work: Path) -> Path:
    """--tokenizer (checked in check_args), else one of --vocab-size trained by our tok_train on the corpus."""
    if args.tokenizer:
        return Path(args.tokenizer).resolve()
    print(f"training a {args.vocab_size:,}-token tokenizer on {args.dataset} (tok_train)", flush=True)
    run_python(["-m", "experiments.launch", f"runs_root={work}", "run_name=tokenizer", "stages=[tok_train]",
                f"dataset={args.dataset}", f"tok_train.vocab_size={args.vocab_size}"], cwd=REPO, pythonpath=REPO)
    return work / "tokenizer" / "tok_train" / "tokenizer"


def check_args(args) -> tuple[dict, list[int]]:
    """The base_train settings both sides take and the decode batch sizes, after the checks that would otherwise
    fail deep in a run."""
    for flag in ("depth", "head_dim", "max_seq_len", "device_batch_size", "total_batch_size", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.steps < 2:
        raise UserError(f"--steps {args.steps}: at least 2 (tok/s is the median of the last half)")
    if not re.fullmatch("[SL]+", args.window_pattern):
        raise UserError(f"--window-pattern {args.window_pattern!r}: letters S and L only (e.g. SSSL)")
    rows = args.device_batch_size * args.max_seq_len
    if args.total_batch_size % rows:
        raise UserError(f"--total-batch-size {args.total_batch_size}: must be a multiple of --device-batch-size x "
                        f"--max-seq-len = {rows}")
    batches = positive_ints(args.decode_batch, "--decode-batch")
    if args.decode_tokens < 2 or args.decode_prompt < 1:
        raise UserError("--decode-tokens must be at least 2 (the first token comes from the prefill) and "
                        "--decode-prompt at least 1")
    missing = [name for name in ("tokenizer.pkl", "token_bytes.pt")
               if args.tokenizer and not (Path(args.tokenizer) / name).is_file()]
    if missing:
        raise UserError(f"--tokenizer {args.tokenizer}: no {', '.join(missing)} (upstream reads those; our tok_train "
                        f"writes them)")
    if args.decode_prompt + args.decode_tokens > args.max_seq_len:
        raise UserError(f"--decode-prompt {args.decode_prompt} + --decode-tokens {args.decode_tokens} exceed "
                        f"--max-seq-len {args.max_seq_len}, the model's context")
    return {"depth": args.depth, "head_dim": args.head_dim, "window_pattern": args.window_pattern,
            "max_seq_len": args.max_seq_len, "device_batch_size": args.device_batch_size,
            "total_batch_size": args.total_batch_size, "num_iterations": args.steps}, batches


def bench_vs_upstream(args) -> None:
    settings, batches = check_args(args)
    checkout = check_checkout(args.upstream)
    python = upstream_python(checkout, args.upstream_python)
    print(f"upstream checkout {checkout_line(checkout)}")
    print(interpreter_line("upstream", python, checkout))
    print(interpreter_line("ours", sys.executable, REPO))
    print(f"base_train: {' '.join(f'{k}={v}' for k, v in settings.items())}, dataset={args.dataset}, "
          f"dtype={args.dtype}, compile={'on' if args.compile else 'off'}, CPU", flush=True)
    with tempfile.TemporaryDirectory(prefix="vs-upstream-") as tmp:
        work = Path(tmp)
        shards = split_files(args.dataset, "train") + split_files(args.dataset, "val")
        tokenizer = tokenizer_for(args, work)
        sides = Sides(checkout, python, lay_out_base_dir(work / "upstream-base", shards, tokenizer), tokenizer,
                      args.dataset, work, args.dtype)
        training = []
        for index in range(1, args.repeats + 1):
            for side, train in (("upstream", train_upstream), ("ours", train_ours)):
                log = work / f"{side}-train-{index}.log"
                print(f"  {side} run {index} (its log: {log}) ", end="", flush=True)
                run = train(sides, settings, args.compile, index, log)
                training.append(run)
                print(f"{run.steady_tok_per_sec:,.0f} tok/s, peak RSS {gib(run.measured.peak_rss)} GiB, "
                      f"{run.measured.wall_s:.0f} s", flush=True)
        exported = work / "export"
        export_upstream(work / "runs" / f"ours-{args.repeats}" / "base_train", exported)
        decoding = [decode(sides, side, exported, index, batches, args.decode_prompt, args.decode_tokens)
                    for index in range(1, args.repeats + 1) for side in ("upstream", "ours")]
    print(f"\nbase_train ({settings['total_batch_size']:,} tokens/step)")
    print(training_table(training, args.steps))
    print(f"ours/upstream: tok/s {ratio_of(training, lambda r: r.steady_tok_per_sec)}, peak RSS "
          f"{ratio_of(training, lambda r: r.measured.peak_rss)} (medians over {args.repeats} run(s) each)")
    print(f"\nEngine decode: greedy, prompt {args.decode_prompt}, {args.decode_tokens} tokens per row, the weights of "
          f"our run {args.repeats} exported in upstream's layout")
    print(decode_table(decoding))
    for i, batch in enumerate(batches):
        rate = ratio_of(decoding, lambda r: r.rows[i]["decode_tok_per_sec"])
        same = side_of(decoding, "ours")[0].rows[i]["tokens"] == side_of(decoding, "upstream")[0].rows[i]["tokens"]
        print(f"batch {batch}: ours/upstream decode tok/s {rate}; {'the same' if same else 'different'} greedy tokens")
