"""Benchmarks that print figures (BENCHMARKS.md records them with the command and the machine).

    python -m experiments.bench data [--dataset embedded] [--tokenizer DIR] [-B 8] [-T 512] [--batches 300]
    python -m experiments.bench train [--depth 4] [--vocab 8192] [-B 8] [-T 512] [--steps 10] [--compile] [--plain-loss]
    python -m experiments.bench checkpoint [--depth 4]      # needs the embedded run's tokenizer (tok_train)
    python -m experiments.bench reshard [--depth 4] [--written-by 2] [--to 1,4,8]
    python -m experiments.bench infer [--depth 4] [--batch 1,8] [--prompt 64,256] [--tokens 32] [--compile]
    python -m experiments.bench gpu [--dry]             # a fresh GPU node's proof; --dry: the same checks CPU-sized
    python -m experiments.bench core [--depth 4] [--bundle DIR] [--examples 100]
    python -m experiments.bench submit [--repeat 5] [--cold] [--stub-sbatch] [--repo DIR]  # localslurm; root
    python -m experiments.bench vs-upstream --upstream DIR [--repeats 2] [--depth 6] [--steps 12] [--dtype float32]
"""

import argparse
import os
import sys
import time
from pathlib import Path

from nanochat.common import run_cli

REPO = Path(__file__).resolve().parent.parent


def bench_data(args) -> None:
    """Pretraining dataloader throughput (tokens/s delivered to the training loop) and crop fraction."""
    from nanochat.dataloader import pretraining_loader
    from nanochat.dataset import split_files
    from nanochat.runs import resolve_runs_root
    from nanochat.tokenizer import Tokenizer

    tok_dir = args.tokenizer or resolve_runs_root() / "embedded-d4" / "tok_train" / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir)
    files = split_files(args.dataset, "train")
    loader = pretraining_loader(tokenizer, files, args.B, args.T, threads=args.threads)
    next(loader)  # start-up (opening shards, first buffer fill) is reported apart from the steady state
    start = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    elapsed = time.perf_counter() - start
    loader.close()
    tokens = args.batches * args.B * args.T
    print(f"dataloader  dataset={args.dataset} vocab={tokenizer.get_vocab_size()} B={args.B} T={args.T} "
          f"threads={args.threads}")
    print(f"  {tokens / elapsed:,.0f} tok/s over {args.batches} batches ({elapsed:.2f}s), "
          f"crop fraction {loader.crop_fraction:.1%}")


def bench_train(args) -> None:
    """Training-step throughput of the real model and optimizer on random tokens: tok/s, MFU, step time and peak
    memory (on CPU the process's peak RSS), after warm-up steps (compilation, allocator)."""
    import resource

    import torch

    from experiments.train_timing import build_for_training, mfu, random_batch, time_training_steps
    from nanochat.distributed import autodetect_device

    device = torch.device(args.device or autodetect_device())
    model, optimizer = build_for_training(args.depth, args.vocab, args.T, device, window_pattern=args.window_pattern,
                                          head_dim=args.head_dim)
    model.fused_loss = not args.plain_loss
    timing = time_training_steps(model, optimizer, random_batch(args.vocab, args.B, args.T, device), args.steps,
                                 args.warmup, "inductor" if args.compile else None)
    utilisation = mfu(model, timing, device)
    memory = (f"{timing.peak_memory / 2**30:.2f} GiB" if timing.peak_memory is not None
              else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS")  # Linux: KiB
    print(f"train  depth={args.depth} n_embd={model.config.n_embd} heads={model.config.n_head} vocab={args.vocab} "
          f"B={args.B} T={args.T} device={device} dtype={model.compute_dtype} compile={args.compile} "
          f"loss={'plain' if args.plain_loss else 'fused'} threads={torch.get_num_threads()}")
    print(f"  {timing.tok_per_sec:,.0f} tok/s | step {timing.step_s * 1000:.1f} ms (median of {args.steps}) | MFU "
          f"{'unknown (no peak FLOP/s for this device)' if utilisation is None else f'{100 * utilisation:.1f}%'} | "
          f"peak memory {memory}")


def bench_checkpoint(args) -> None:
    """Checkpoint size and save time for the real model + optimizer, and the time from process start to the first
    resumed step of a base_train run killed with SIGKILL after its first checkpoint."""
    import json
    import os
    import signal
    import subprocess
    import tempfile
    from pathlib import Path

    import torch

    from nanochat.checkpoint import CheckpointManager, rng_state
    from nanochat.storage import HASH, file_digest
    from nanochat.tokenizer import DEFAULT_VOCAB_SIZE
    from nanochat.gpt import GPT, model_config_for_depth
    from nanochat.config import learning_rates
    from nanochat.optim import build_optimizer
    from nanochat.optim_state import pieces
    from nanochat.runs import resolve_runs_root

    config = model_config_for_depth(args.depth, 8192, 512)
    model = GPT.build(config)
    optimizer = build_optimizer(model.param_groups(), d_model=config.n_embd, **learning_rates())
    model(torch.randint(0, 8192, (1, 64)), torch.randint(0, 8192, (1, 64))).backward()
    optimizer.step()  # optimizer state exists only after a step
    def best_of_3(body) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            body()
            times.append(time.perf_counter() - start)
        return min(times)

    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        manager = CheckpointManager(tmp)
        steps = iter(range(1, 100))
        names = {p: name for name, p in model.named_parameters()}
        save = best_of_3(lambda: manager.save(next(steps), model.state_dict(), pieces(optimizer, names),
                                              {"rng": rng_state()}, {}))
        newest = manager.complete()[-1]
        files = [f for f in newest.iterdir() if f.suffix == ".pt"]
        size = sum(f.stat().st_size for f in files)

        def plain_save():  # the same files without the checksum: what the save cost before verification
            for f in files:
                with open(Path(tmp) / "plain.pt", "wb") as out:
                    torch.save(torch.load(f, weights_only=True), out)
                    out.flush()
                    os.fsync(out.fileno())
        plain = best_of_3(plain_save) - best_of_3(lambda: [torch.load(f, weights_only=True) for f in files])
        load = best_of_3(lambda: manager.load())
        raw_load = best_of_3(lambda: [torch.load(f, weights_only=True) for f in files])
        hashing = best_of_3(lambda: [file_digest(f) for f in files])
        space = best_of_3(lambda: manager._say_if_short_of_space(0))
    throughput = size / hashing
    print(f"checkpoint  depth={args.depth} params={params:,}: {size / 2**20:.1f} MiB; best of 3, fsync included:")
    print(f"  save {1000 * save:.0f} ms with checksums, {1000 * plain:.0f} ms without; load {1000 * load:.0f} ms "
          f"verified, {1000 * raw_load:.0f} ms unverified; {HASH} {throughput / 2**30:.2f} GiB/s; "
          f"free-space check {1000 * space:.2f} ms")
    for depth in (20, 26):  # the same bytes per parameter, hashed at the throughput just measured
        with torch.device("meta"):
            n = sum(p.numel() for p in GPT(model_config_for_depth(depth, DEFAULT_VOCAB_SIZE, 2048)).parameters())
        print(f"  d{depth} ({n / 1e6:.0f}M params): ~{size / params * n / 2**30:.1f} GiB per checkpoint, "
              f"verification ~{size / params * n / throughput:.1f} s of one core (split across ranks by shard)")

    tokenizer = resolve_runs_root() / "embedded-d4" / "tok_train" / "tokenizer"
    with tempfile.TemporaryDirectory() as runs:
        cmd = [sys.executable, "-m", "experiments.launch", "stages=[base_train]", f"depth={args.depth}",
               "num_iterations=6", "save_every=2", "eval_every=-1", "sample_every=-1", f"runs_root={runs}",
               "run_name=bench", f"tokenizer={tokenizer}"]
        metrics = Path(runs) / "bench" / "base_train" / "metrics.jsonl"

        def wait_for_step(proc, step, since=0.0):  # a row this process logged (the killed one left rows too)
            while proc.poll() is None:
                rows = metrics.read_text().splitlines() if metrics.exists() else []
                if rows and json.loads(rows[-1])["step"] >= step and json.loads(rows[-1])["wall"] >= since:
                    return
                time.sleep(0.01)
            raise SystemExit(f"the run ended before step {step}: {proc.returncode}")

        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=os.environ)
        wait_for_step(first, 3)  # the checkpoint of step 2 is complete
        first.send_signal(signal.SIGKILL)
        first.wait()
        start = time.time()
        second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=os.environ)
        wait_for_step(second, 3, since=start)
        elapsed = time.time() - start
        second.wait()
    print(f"resume      process start -> first resumed step done: {elapsed:.2f}s (includes that step)")


def bench_infer(args) -> None:
    from experiments.bench_infer import bench_infer as run  # torch only for the benchmark that needs it

    run(args)


def bench_vs_upstream(args) -> None:
    from experiments.bench_vs_upstream import bench_vs_upstream as run

    run(args)


def bench_reshard(args) -> None:
    from experiments.bench_reshard import bench_reshard as run  # torch only for the benchmark that needs it

    run(args)


def bench_gpu(args) -> None:
    from experiments.gpu_check import run_checks

    if not run_checks(args.dry):
        raise SystemExit(1)  # a check FAILed: the table says which


def _synthetic_bundle(folder, examples: int) -> None:
    """A bundle in the DCLM layout with CORE's three task types at its shot counts (0, 5, 10) and roughly its
    text lengths, from the shipped word list: for timing where the real bundle is not staged."""
    import json
    import random
    from pathlib import Path

    words = (Path(__file__).parents[1] / "tasks" / "data" / "words.txt").read_text().split()
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choices(words, k=n))

    kinds = {"mc": ("multiple_choice", 10, 25.0, lambda: {"query": text(40), "choices": [text(12) for _ in range(4)],
                                                         "gold": rng.randrange(4)}),
             "schema": ("schema", 0, 50.0, lambda: {"context_options": [text(20), text(20)],
                                                    "continuation": text(8), "gold": rng.randrange(2)}),
             "lm": ("language_modeling", 5, 0.0, lambda: {"context": text(30), "continuation": text(4)})}
    lines, rows = ["icl_tasks:"], ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,"
                                   "Centered Metric?,Description"]
    for label, (kind, shots, baseline, make) in kinds.items():
        lines += [f"- label: {label}", f"  dataset_uri: {label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", "  continuation_delimiter: ' '"]
        (folder / "eval_data").mkdir(parents=True, exist_ok=True)
        (folder / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(make()) + "\n"
                                                                    for _ in range(examples)))
        rows.append(f"{label},x,{kind},{shots},{examples},{baseline},yes,synthetic")
    (folder / "core.yaml").write_text("\n".join(lines) + "\n")
    (folder / "eval_meta_data.csv").write_text("\n".join(rows) + "\n")


def bench_core(args) -> None:
    """CORE evaluation throughput (examples/s) of a random-init model: the real bundle if given, else a synthetic
    one with CORE's task types and shot counts."""
    import tempfile
    from pathlib import Path

    import torch

    from nanochat.core_eval import evaluate_core, load_bundle
    from nanochat.distributed import autodetect_device, compute_dtype
    from nanochat.gpt import GPT, model_config_for_depth
    from nanochat.runs import resolve_runs_root
    from nanochat.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer or resolve_runs_root() / "embedded-d4" / "tok_train" / "tokenizer")
    device = torch.device(args.device or autodetect_device())
    config = model_config_for_depth(args.depth, tokenizer.get_vocab_size(), 2048)
    model = GPT.build(config, device=device, compute_dtype=compute_dtype(device.type)[0]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else Path(tmp)
        if not args.bundle:
            _synthetic_bundle(bundle, args.examples)
        tasks = load_bundle(bundle)
        examples = sum(min(args.examples, len(Path(t["data_path"]).read_text().splitlines())) for t in tasks)
        start = time.perf_counter()
        evaluate_core(model, tokenizer, device, bundle_dir=bundle, max_per_task=args.examples)
        elapsed = time.perf_counter() - start
    print(f"core  depth={args.depth} device={device} bundle={'synthetic' if not args.bundle else bundle} "
          f"tasks={len(tasks)} examples={examples}")
    print(f"  {examples / elapsed:,.1f} examples/s ({elapsed:.1f}s)")


def bench_submit(args) -> None:
    """Wall time of `python -m experiments.launch +cluster=localslurm` on the embedded preset, from the command to
    the prompt: each submission a fresh run under a temporary runs_root; its jobs are cancelled at once. With
    --stub-sbatch, an `sbatch` that only prints a job id comes first on PATH: the launcher's own time, without
    the cluster (and without its lock)."""
    import re
    import statistics
    import subprocess
    import tempfile

    def submit_once(runs_root: str, name: str, env: dict) -> float:
        command = [sys.executable, "-m", "experiments.launch", "+cluster=localslurm", f"runs_root={runs_root}",
                   f"run_name={name}"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=args.repo, env=env)
        elapsed = time.perf_counter() - start
        ids = re.findall(r"^  job (\d+):", done.stdout, re.MULTILINE)
        if ids and not args.stub_sbatch:
            subprocess.run(["scancel", *ids], check=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
        return elapsed

    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(args.repo)}
        if args.stub_sbatch:
            stub = Path(tmp) / "bin" / "sbatch"
            stub.parent.mkdir()
            stub.write_text("#!/bin/sh\necho 'Submitted batch job 999999'\n")
            stub.chmod(0o755)
            env["PATH"] = f"{stub.parent}:{env['PATH']}"
        submit_once(tmp, "warm-up", env)  # the first run fills the page cache (and materializes the corpus)
        warm = [submit_once(tmp, f"warm-{i}", env) for i in range(args.repeat)]
        print(f"submit  +cluster=localslurm, embedded preset, {args.repeat} submissions, code in {args.repo}"
              f"{', sbatch stubbed' if args.stub_sbatch else ''}")
        print(f"  warm: median {statistics.median(warm):.2f}s (min {min(warm):.2f}s, max {max(warm):.2f}s)")
        if args.cold:  # the page cache dropped: what the first submission of a login session pays
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            print(f"  cold (page cache dropped): {submit_once(tmp, 'cold', env):.2f}s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="dataloader tokens/s and crop fraction")
    data.add_argument("--dataset", default="embedded")
    data.add_argument("--tokenizer", help="tokenizer folder (default: the embedded run's)")
    data.add_argument("-B", type=int, default=8)
    data.add_argument("-T", type=int, default=512)
    data.add_argument("--batches", type=int, default=300)
    data.add_argument("--threads", type=int, default=4)
    train = sub.add_parser("train", help="training step tok/s, MFU, step time, peak memory")
    train.add_argument("--depth", type=int, default=4)
    train.add_argument("--vocab", type=int, default=8192)
    train.add_argument("-B", type=int, default=8)
    train.add_argument("-T", type=int, default=512)
    train.add_argument("--steps", type=int, default=10)
    train.add_argument("--warmup", type=int, default=3)
    train.add_argument("--window-pattern", default="SSSL")
    train.add_argument("--head-dim", type=int, default=128)
    train.add_argument("--plain-loss", action="store_true", help="upstream's loss path (whole logits), not the fused")
    train.add_argument("--device", default="")
    train.add_argument("--compile", action="store_true")
    checkpoint = sub.add_parser("checkpoint", help="checkpoint size, save time, time to the first resumed step")
    checkpoint.add_argument("--depth", type=int, default=4)
    reshard = sub.add_parser("reshard", help="time and peak memory of resuming on another number of ranks")
    reshard.add_argument("--depth", type=int, default=4)
    reshard.add_argument("--written-by", type=int, default=2, help="the world size that writes the checkpoint")
    reshard.add_argument("--to", default="1,4,8", help="the world sizes that resume it, comma-separated")
    infer = sub.add_parser("infer", help="KV-cache engine over prompts and batches: TTFT, TPOT, tok/s, FLOPs, MBU")
    infer.add_argument("--depth", type=int, default=4)
    infer.add_argument("--vocab", type=int, default=8192)
    infer.add_argument("--seq-len", type=int, default=2048, help="the model's context (its windows follow it)")
    infer.add_argument("--window-pattern", default="SSSL")
    infer.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    infer.add_argument("--prompt", default="64,256", help="prompt lengths, comma-separated")
    infer.add_argument("--tokens", type=int, default=32, help="tokens generated per row")
    infer.add_argument("--device", default="")
    infer.add_argument("--compile", action="store_true", help="torch.compile the model the engine steps")
    gpu = sub.add_parser("gpu", help="one table proving the GPU path: bf16, attention, compile, fp8, MFU, decode")
    gpu.add_argument("--dry", action="store_true", help="the same checks CPU-sized; the CUDA-only rows are skipped")
    core = sub.add_parser("core", help="CORE examples/s")
    core.add_argument("--depth", type=int, default=4)
    core.add_argument("--bundle", help="a staged eval bundle (default: a synthetic one)")
    core.add_argument("--tokenizer", help="tokenizer folder (default: the embedded run's)")
    core.add_argument("--examples", type=int, default=100, help="examples per task")
    core.add_argument("--device", default="")
    submit = sub.add_parser("submit", help="wall time of a submission to the local Slurm cluster, warm and cold")
    submit.add_argument("--repeat", type=int, default=5)
    submit.add_argument("--cold", action="store_true", help="then drop the page cache (root) and submit once more")
    submit.add_argument("--stub-sbatch", action="store_true", help="time the launcher alone, with a fake sbatch")
    submit.add_argument("--repo", default=REPO, help="the checkout to time (e.g. an older commit's, to compare)")
    vs = sub.add_parser("vs-upstream", help="upstream's base_train and Engine against ours: tok/s, peak RSS, ratio "
                                            "(CPU; defaults: the reference config of issue 19)")
    vs.add_argument("--upstream", required=True, help="a checkout of karpathy/nanochat")
    vs.add_argument("--upstream-python", help="its interpreter (default: DIR/.venv/bin/python if there, else ours)")
    vs.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    vs.add_argument("--depth", type=int, default=6)
    vs.add_argument("--head-dim", type=int, default=64)
    vs.add_argument("--window-pattern", default="L")
    vs.add_argument("--max-seq-len", type=int, default=512)
    vs.add_argument("--device-batch-size", type=int, default=32)
    vs.add_argument("--total-batch-size", type=int, default=16384)
    vs.add_argument("--steps", type=int, default=12, help="training steps; tok/s is the median of the last half")
    vs.add_argument("--vocab-size", type=int, default=32768, help="of the tokenizer trained for both sides")
    vs.add_argument("--tokenizer", help="a tokenizer folder with tokenizer.pkl + token_bytes.pt instead")
    vs.add_argument("--dataset", default="embedded", help="the corpus both sides train on (staged shards)")
    vs.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="NANOCHAT_DTYPE of both")
    vs.add_argument("--no-compile", dest="compile", action="store_false",
                    help="both sides eager (upstream: TORCHDYNAMO_DISABLE=1)")
    vs.add_argument("--decode-batch", default="1,8", help="Engine batch sizes, comma-separated")
    vs.add_argument("--decode-prompt", type=int, default=64, help="prompt tokens")
    vs.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per row")
    args = parser.parse_args(argv)
    bench = {"data": bench_data, "train": bench_train, "checkpoint": bench_checkpoint, "reshard": bench_reshard,
             "infer": bench_infer, "gpu": bench_gpu, "core": bench_core, "submit": bench_submit,
             "vs-upstream": bench_vs_upstream}[args.what]
    return run_cli(lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
