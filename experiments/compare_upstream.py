"""The first training losses of our base_train and of upstream nanochat's scripts/base_train.py, on the same shards
and tokenizer, fp32 on CPU, side by side with their largest difference (BENCHMARKS.md, issue 17):

    PYTHONPATH=$PWD .venv/bin/python -m experiments.compare_upstream /tmp/upstream

(/tmp/upstream: a checkout of karpathy/nanochat, e.g. `git archive HEAD | tar -x -C /tmp/upstream`.) Ours runs as
`python -m experiments.launch` with stages tok_train and base_train on the embedded corpus; upstream's runs in a
subprocess on the same training and validation shards and the tokenizer our tok_train wrote, with its own
defaults for everything not set here (horizon, learning rates, warmup, weight decay), as ours has them. Both have
their evaluations, CORE and samples off. Upstream runs with NANOCHAT_DTYPE=float32 and TORCHDYNAMO_DISABLE=1: it
calls torch.compile unconditionally, which on CPU would spend minutes in gcc; ours runs with the same dtype and
compile=false (its default on CPU depends on the run's size and on the CPU's bf16). Its log
shows only a smoothed loss, so a forward hook records its model's loss on every micro-batch, averaged per step as
ours logs it. The final weights are compared too (weights_sha256 of each side's last checkpoint). Ours computes
its loss as upstream's (`fused_loss=false`), unless --fused-loss: then as it trains by default, in row chunks,
whose other summation order moves the losses by ~1e-6. Exit code 1 when the losses differ by more than
--tolerance.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_NAME = "compare-upstream"
SETTINGS = ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "num_iterations")  # the keys set


def upstream_side(out: str, argv: list[str]) -> None:
    """In the subprocess, with upstream's `nanochat` package: its base_train, the loss of each micro-batch
    recorded from its model's forward (training mode, with targets: a scalar), written to `out` as JSON."""
    import runpy

    import torch

    losses = []

    def record(module, args, output):
        if type(module).__name__ == "GPT" and module.training and torch.is_tensor(output) and output.ndim == 0:
            losses.append(output.item())

    torch.nn.modules.module.register_module_forward_hook(record)
    sys.argv = ["scripts/base_train.py", *argv]
    runpy.run_module("scripts.base_train", run_name="__main__")
    Path(out).write_text(json.dumps(losses))


def upstream_training(checkout: Path, shards: list[Path], tokenizer_dir: Path, settings: dict):
    """Upstream's base_train on `shards` (training shards, then the validation shard) with `settings`: the loss of
    every micro-batch, and its final weights (a state dict)."""
    import torch

    from experiments.upstream import lay_out_base_dir, run_upstream, upstream_flags

    with tempfile.TemporaryDirectory() as tmp:
        base = lay_out_base_dir(Path(tmp), shards, tokenizer_dir)
        out = Path(tmp) / "losses.json"
        run_upstream(checkout, base, [str(Path(__file__).resolve()), "--upstream-side", str(out), "--",
                                      *upstream_flags(settings)], NANOCHAT_DTYPE="float32", TORCHDYNAMO_DISABLE="1")
        [weights] = (base / "base_checkpoints").glob(f"*/model_{settings['num_iterations']:06d}.pt")
        return json.loads(out.read_text()), torch.load(weights, map_location="cpu", weights_only=True)


def per_step(micro_losses: list[float], settings: dict) -> list[float]:
    accum = settings["total_batch_size"] // (settings["device_batch_size"] * settings["max_seq_len"])
    return [sum(micro_losses[i:i + accum]) / accum for i in range(0, len(micro_losses), accum)]


def compare(args) -> bool:
    from experiments.upstream import check_checkout, our_overrides, run_python
    from nanochat.checkpoint import weights_sha256
    from nanochat.dataset import split_files
    from nanochat.runs import read_jsonl

    checkout = check_checkout(args.upstream)
    settings = {key: getattr(args, key) for key in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = (Path(args.runs_root).resolve() if args.runs_root else Path(tmp)) / RUN_NAME
        run_python(["-m", "experiments.launch", f"runs_root={run_dir.parent}", f"run_name={RUN_NAME}",
                    "stages=[tok_train,base_train]", "dataset=embedded", *our_overrides(settings, args.fused_loss),
                    "compile=false"], cwd=REPO, pythonpath=REPO, NANOCHAT_DTYPE="float32")
        rows = read_jsonl(run_dir / "base_train" / "metrics.jsonl")
        ours = [row["loss"] for row in sorted(rows, key=lambda row: row["step"]) if "loss" in row]
        our_weights = json.loads((run_dir / "base_train" / "summary.json").read_text())["weights_sha256"]
        shards = split_files("embedded", "train") + split_files("embedded", "val")
        micro, weights = upstream_training(checkout, shards, run_dir / "tok_train" / "tokenizer", settings)
    theirs = per_step(micro, settings)
    print(f"depth {args.depth}, T={args.max_seq_len}, B={args.device_batch_size}, {args.total_batch_size} "
          f"tokens/step, fp32 on CPU, our loss {'fused' if args.fused_loss else 'plain'}; loss per step")
    print(f"{'step':>4}  {'ours':>10}  {'upstream':>10}  {'|diff|':>9}")
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        print(f"{step:>4}  {a:>10.6f}  {b:>10.6f}  {abs(a - b):>9.2e}")
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    same_length = len(ours) == len(theirs) == args.num_iterations
    print(f"max |diff| {worst:.2e} over {min(len(ours), len(theirs))} steps (tolerance {args.tolerance:g})"
          + ("" if same_length else f"; step counts differ: ours {len(ours)}, upstream {len(theirs)}"))
    theirs_weights = weights_sha256(weights)
    print(f"final weights: {'the same' if our_weights == theirs_weights else 'different'} (weights_sha256 ours "
          f"{our_weights[:16]}..., upstream {theirs_weights[:16]}...)")
    return same_length and worst <= args.tolerance


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--upstream-side":  # the subprocess's part (see upstream_side)
        upstream_side(sys.argv[2], sys.argv[4:])
        return 0
    p = argparse.ArgumentParser(prog="python -m experiments.compare_upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("upstream", help="a checkout of karpathy/nanochat")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--total-batch-size", type=int, default=1024)
    p.add_argument("--num-iterations", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest loss difference that passes")
    p.add_argument("--fused-loss", action="store_true", help="ours with its default fused loss (not upstream's sums)")
    p.add_argument("--runs-root", help="keep our run here (default: a temporary folder, removed afterwards)")
    args = p.parse_args()

    from nanochat.common import run_cli

    ok = True

    def body() -> None:
        nonlocal ok
        ok = compare(args)

    return run_cli(body) or (0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
