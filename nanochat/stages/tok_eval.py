"""Stage tok_eval: compression (UTF-8 bytes per token) of our tokenizer against GPT-2's and GPT-4's.

The reference encodings come from tiktoken's cache, which the staging step fills (they are downloaded files);
when they are not staged, the stage says so and reports our tokenizer alone rather than reaching the network.
"""

import itertools

import pyarrow.parquet as pq

from nanochat.assets import load_tiktoken
from nanochat.common import print0
from nanochat.dataset import split_files
from nanochat.stages import load_tokenizer

SAMPLES = {
    "prose": ("The committee met on Tuesday to review the budget for the new library wing. After two hours of "
              "debate, members agreed to postpone the vote until the architects deliver revised cost estimates."),
    "code": ("def moving_average(values, window):\n    total = sum(values[:window])\n    out = [total / window]\n"
             "    for i in range(window, len(values)):\n        total += values[i] - values[i - window]\n"
             "        out.append(total / window)\n    return out\n"),
    "math": "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12 = 0 at x = 2, and f(2) = 12 - 24 + 7 = -5.",
    "science": ("Mitochondria produce most of a cell's ATP through oxidative phosphorylation, in which electrons "
                "pass along a chain of membrane proteins that pump protons across the inner membrane."),
    "multilingual": "Über den Wolken. Le café est très chaud. 東京は日本の首都です. Привет, мир!",
}
REFERENCES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}


def split_sample(dataset: str, split: str, n_docs: int) -> str:
    texts = (t for path in split_files(dataset, split)
             for t in pq.read_table(path, columns=["text"]).column("text").to_pylist())
    return "\n".join(itertools.islice(texts, n_docs))


def execute(cfg, run, tasks=None) -> dict:
    ours = load_tokenizer(cfg, run)
    references = {name: load_tiktoken(enc) for name, enc in REFERENCES.items()}
    texts = {**SAMPLES, **{f"{cfg.dataset}-{split}": split_sample(cfg.dataset, split, cfg.tok_eval.docs)
                           for split in ("train", "val")}}
    table = {}
    for name, text in texts.items():
        row = {"bytes": len(text.encode("utf-8")), "ours": len(ours.encode(text))}
        for ref, enc in references.items():
            row[ref] = len(enc.encode_ordinary(text)) if enc is not None else None
        row["ratio"] = round(row["bytes"] / row["ours"], 3)
        table[name] = row
    missing = [REFERENCES[ref] for ref, enc in references.items() if enc is None]
    header = f"{'text':<22}{'bytes':>9}{'ours':>8}{'gpt2':>8}{'gpt4':>8}  bytes/token (ours)"
    print0(header)
    for name, row in table.items():
        cells = "".join(f"{row[k] if row[k] is not None else '-':>8}" for k in ("ours", "gpt2", "gpt4"))
        print0(f"{name:<22}{row['bytes']:>9}{cells}  {row['ratio']}")
    if missing:
        print0(f"tok_eval: {', '.join(missing)} not staged, so no comparison; stage with: "
               f"python -m nanochat.dataset --assets-only")
    return {"vocab_size": ours.get_vocab_size(), "texts": table, "references_missing": missing}
