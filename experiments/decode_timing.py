"""Greedy decode tok/s of a KV-cache `Engine` on a checkpoint in upstream's layout, in a process of its own:

    python -m experiments.decode_timing {ours|upstream} CHECKPOINT_DIR OUT_JSON [--batch 1,8] [--prompt 64]
        [--tokens 64]

`python -m experiments.bench vs-upstream` runs it twice on the same exported weights: in our interpreter with our
`nanochat`, and in upstream's with upstream's checkout first on the path, so that one timing drives either
package's own loader and Engine. That is why nothing here imports nanochat at the top (which `nanochat` is depends
on the path), and why the stand-in tokenizer comes from experiments.random_model, which imports none of it.

Per batch size: an untimed warm-up call of the same shape, then one timed `generate` of --tokens tokens per row at
temperature 0 from a fixed prompt. The first token comes from the prefill; decode tok/s is all rows' later tokens
over the time of those decode steps (as `experiments.bench infer` counts it). The stand-in tokenizer's stop and
tool tokens are outside the vocabulary, so every row runs to --tokens on both sides; the first row's tokens are
written too, so that the caller can check both sides computed the same thing.
"""

import argparse
import json
import time
from pathlib import Path


def step_times(stream) -> tuple[float, list[float]]:
    """(seconds to the first token, seconds of each later step) of one Engine.generate stream."""
    start = time.perf_counter()
    next(stream)
    first = time.perf_counter() - start
    steps, last = [], time.perf_counter()
    for _ in stream:
        now = time.perf_counter()
        steps.append(now - last)
        last = now
    return first, steps


def recording_first_row(stream, into: list):
    """`stream`, appending each step's token of the first row to `into` on the way."""
    for column, masks in stream:
        into.append(column[0])
        yield column, masks


def load_model(side: str, checkpoint: str):
    """The model of `checkpoint` in eval mode, on the CPU, by the side's own loader."""
    import torch

    if side == "upstream":
        from nanochat.checkpoint_manager import build_model, find_last_step

        model, _, _ = build_model(checkpoint, find_last_step(checkpoint), torch.device("cpu"), "eval")
    else:
        from nanochat.model_io import load_model as load_ours

        model, _ = load_ours(checkpoint)
        model.for_inference()  # as our chat and evaluation stages load it
    return model


def fixed_prompt(length: int, vocab_size: int) -> list[int]:
    return [(7919 * i + 1) % vocab_size for i in range(length)]  # a prime stride: varied ids, the same every run


def decode_rates(side: str, checkpoint: str, batches: list[int], prompt_len: int, tokens: int) -> dict:
    import torch

    from experiments.random_model import NoStops
    from nanochat.engine import Engine

    model = load_model(side, checkpoint)
    vocab = model.config.vocab_size
    engine = Engine(model, NoStops(vocab))
    prompt = fixed_prompt(prompt_len, vocab)
    rows = []
    for batch in batches:
        list(engine.generate(prompt, num_samples=batch, max_tokens=min(tokens, 4), temperature=0.0))  # warm-up
        first_row = []
        stream = engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=0.0)
        _, steps = step_times(recording_first_row(stream, first_row))
        rows.append({"batch": batch, "decode_tok_per_sec": batch * len(steps) / sum(steps), "tokens": first_row})
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.decode_timing", description=__doc__.split("\n\n")[0])
    p.add_argument("side", choices=["ours", "upstream"])
    p.add_argument("checkpoint", help="a folder with model_NNNNNN.pt + meta_NNNNNN.json")
    p.add_argument("out", help="where the JSON result goes")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per row")
    args = p.parse_args()
    result = decode_rates(args.side, args.checkpoint, [int(b) for b in args.batch.split(",")], args.prompt,
                          args.tokens)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
