"""Benchmarks that print figures (BENCHMARKS.md records them with the command and the machine).

    python -m experiments.bench data [--dataset embedded] [--tokenizer DIR] [-B 8] [-T 512] [--batches 300]
"""

import argparse
import sys
import time

from nanochat.common import UserError


def bench_data(args) -> None:
    """Pretraining dataloader throughput (tokens/s delivered to the training loop) and crop fraction."""
    from nanochat.dataloader import pretraining_loader
    from nanochat.dataset import split_files
    from nanochat.runs import default_runs_root
    from nanochat.tokenizer import Tokenizer

    tok_dir = args.tokenizer or default_runs_root() / "embedded-d4" / "tok_train" / "tokenizer"
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
    args = parser.parse_args(argv)
    try:
        {"data": bench_data}[args.what](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
