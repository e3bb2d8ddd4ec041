"""Stage tok_train: train the BPE tokenizer on the training split of the run's dataset."""

import time

import pyarrow.parquet as pq

from nanochat.common import print0
from nanochat.dataset import split_files
from nanochat.progress import Progress
from nanochat.tokenizer import Tokenizer


def training_texts(files, max_chars: int, doc_cap: int, counts: dict):
    """Documents in shard order, each cut to doc_cap characters, until max_chars have been read."""
    for path in files:
        parquet = pq.ParquetFile(path)
        for rg in range(parquet.num_row_groups):
            for text in parquet.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                text = text[:doc_cap]
                counts["docs"] += 1
                counts["chars"] += len(text)
                yield text
                if counts["chars"] >= max_chars:
                    return


def reported(texts, max_chars: int, vocab_size: int):
    """`texts` as the trainer reads them, with a progress bar of the characters read of max_chars; then one line
    for the merges it computes once it has read them all, as rustbpe reports no progress of its own."""
    with Progress(max_chars, "tok_train text", scale=(1e6, "M chars")) as bar:
        for text in texts:
            bar.advance(len(text))
            yield text
    print0(f"tok_train: text read; merging up to a vocab of {vocab_size:,} (rustbpe shows no progress)")


def execute(cfg, run, tasks=None) -> dict:
    c = cfg.tok_train
    counts = {"docs": 0, "chars": 0}
    start = time.time()
    texts = training_texts(split_files(cfg.dataset, "train"), c.max_chars, c.doc_cap, counts)
    tokenizer = Tokenizer.train(reported(texts, c.max_chars, c.vocab_size), c.vocab_size)
    train_time = time.time() - start
    if tokenizer.get_vocab_size() < c.vocab_size:  # the text had too few distinct pairs to merge
        print0(f"warning: trained vocab is {tokenizer.get_vocab_size()}, short of vocab_size={c.vocab_size}")
    sample = "The quick brown fox, naïve café 東京, 3.14159 and <|bos|>\n\tdef f(): return 1"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample, "tokenizer does not round-trip"
    tokenizer.save(run.tokenizer_dir)
    print0(f"tok_train: vocab {tokenizer.get_vocab_size():,} from {counts['docs']:,} docs / {counts['chars']:,} chars "
           f"in {train_time:.1f}s -> {run.tokenizer_dir}")
    return {"vocab_size": tokenizer.get_vocab_size(), "train_docs": counts["docs"], "train_chars": counts["chars"],
            "train_time_s": round(train_time, 3), "dataset": cfg.dataset, "tokenizer_dir": str(run.tokenizer_dir)}
