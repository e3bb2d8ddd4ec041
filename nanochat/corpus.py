"""The embedded corpus: ~9.6M characters of the Python 3.11 documentation (PSF licence, see
nanochat/data/EMBEDDED_CORPUS_LICENSE.txt) shipped in the repo, so the pipeline trains offline on a fresh
machine. materialize() turns it into parquet shards in upstream nanochat's layout. Rebuilt with
nanochat/corpus_build.py (then update EMBEDDED_SHA256).
"""

import hashlib
import json
import lzma
import random
from pathlib import Path

from nanochat.common import UserError, atomic_file, atomic_write_json, fsync_dir

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "embedded_corpus.jsonl.xz"
EMBEDDED_SHA256 = "755e47c28da35ec6ae495f0ffaa68f5746c1afa1721dd61c5c1ec71b7ece5d76"
VAL_FRACTION = 0.05
MIN_VAL_DOCS = 256    # ~5% of 3158 docs is too few for a stable val loss; 256 docs is ~0.8M chars
ROW_GROUP_DOCS = 32   # small row groups: the dataloader deals row groups out to DDP ranks
MANIFEST = "manifest.json"
FORMAT = 1            # bump when the split or shard layout changes, so old shards get rewritten


def _shown(path: Path) -> str:
    """The path as the user would type it for git (relative to the repo root when inside it)."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return str(path)


def load_documents() -> list[str]:
    """All documents, checked against EMBEDDED_SHA256, in a fixed shuffled order (so every shard gets a mix)."""
    path = Path(CORPUS_PATH)
    shown = _shown(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"embedded corpus {shown} is missing; restore it with: git checkout -- {shown}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != EMBEDDED_SHA256:
        raise UserError(f"embedded corpus {shown} is corrupt (sha256 {digest[:12]}… != expected "
                        f"{EMBEDDED_SHA256[:12]}…); restore it with: git checkout -- {shown}")
    texts = [json.loads(line)["text"] for line in lzma.decompress(data).decode("utf-8").splitlines()]
    random.Random(0).shuffle(texts)
    return texts


def _split(texts: list[str], num_train_shards: int) -> list[list[str]]:
    """Contiguous slices of the shuffled docs: num_train_shards train shards, then the val shard."""
    num_val = min(max(MIN_VAL_DOCS, round(VAL_FRACTION * len(texts))), len(texts) // 4)
    train, val = texts[:len(texts) - num_val], texts[len(texts) - num_val:]
    n = len(train)
    return [train[i * n // num_train_shards:(i + 1) * n // num_train_shards] for i in range(num_train_shards)] + [val]


def _write_shard(path: Path, texts: list[str]) -> None:
    """Atomic, so concurrent ranks and crashes never leave a torn shard under the real name."""
    import pyarrow as pa  # imported here: keeps `import nanochat.corpus` cheap
    import pyarrow.parquet as pq
    with atomic_file(path) as f:
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), f,
                       row_group_size=ROW_GROUP_DOCS, compression="zstd")


def materialize(dest_dir, num_train_shards: int = 8) -> list[Path]:
    """Write shard_00000.parquet … into dest_dir (the last one is val); a no-op when they are already complete."""
    if num_train_shards < 1:
        raise UserError(f"num_train_shards must be at least 1, got {num_train_shards}")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    names = [f"shard_{i:05d}.parquet" for i in range(num_train_shards + 1)]
    paths = [dest / name for name in names]
    key = {"corpus_sha256": EMBEDDED_SHA256, "format": FORMAT, "row_group_docs": ROW_GROUP_DOCS, "shards": names}
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if all(manifest.get(k) == v for k, v in key.items()) and all(p.is_file() for p in paths):
        return paths

    shards = _split(load_documents(), num_train_shards)
    for path, texts in zip(paths, shards):
        _write_shard(path, texts)
    for stale in dest.glob("shard_*.parquet"):  # e.g. from a run with more shards: readers list the folder
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    fsync_dir(dest)
    # Written last: its presence (with this corpus's hash) means every shard above is complete.
    atomic_write_json(dest / MANIFEST, {**key, "docs_per_shard": [len(s) for s in shards], "val_shard": names[-1]})
    return paths
