"""The shipped corpus: integrity check, deterministic shards in upstream's layout, idempotence, real prose."""

import json
import lzma
import shutil

import pyarrow.parquet as pq
import pytest

from nanochat import corpus
from nanochat.common import UserError


@pytest.fixture(scope="module")
def docs():
    return corpus.load_documents()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return corpus.materialize(tmp_path_factory.mktemp("embedded"))


def texts(path):
    return pq.read_table(path).column("text").to_pylist()


def test_shipped_file_matches_its_hash_and_the_build_format():
    import hashlib
    data = corpus.CORPUS_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == corpus.EMBEDDED_SHA256
    first = json.loads(lzma.decompress(data).decode("utf-8").splitlines()[0])
    assert set(first) == {"source", "text"} and first["source"].endswith(".rst.txt")


def test_corrupt_or_missing_corpus_is_a_one_line_user_error(tmp_path, monkeypatch):
    bad = tmp_path / "embedded_corpus.jsonl.xz"
    data = bytearray(corpus.CORPUS_PATH.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(corpus, "CORPUS_PATH", bad)
    with pytest.raises(UserError, match=r"is corrupt \(sha256 [0-9a-f]{12}… != expected [0-9a-f]{12}…\); "
                                        r"restore it with: git checkout -- ") as err:
        corpus.load_documents()
    assert "\n" not in str(err.value) and corpus.EMBEDDED_SHA256[:12] in str(err.value)
    bad.unlink()
    with pytest.raises(UserError, match="is missing; restore it with: git checkout -- "):
        corpus.load_documents()
    with pytest.raises(UserError):  # materialize checks too, and leaves no shard behind
        corpus.materialize(tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


def test_error_names_the_repo_relative_path():
    assert corpus._shown(corpus.CORPUS_PATH) == "nanochat/data/embedded_corpus.jsonl.xz"


def test_documents_are_shuffled_deterministically(docs):
    raw = [json.loads(l)["text"] for l in lzma.open(corpus.CORPUS_PATH, "rt", encoding="utf-8")]
    assert docs == corpus.load_documents()
    assert sorted(docs) == sorted(raw) and docs != raw
    # shuffled: the first 100 docs come from many different files, not one or two
    sources = {json.loads(l)["text"]: json.loads(l)["source"] for l in lzma.open(corpus.CORPUS_PATH, "rt")}
    assert len({sources[t] for t in docs[:100]}) > 40


def test_documents_are_english_prose(docs):
    lengths = sorted(len(d) for d in docs)
    assert 2000 < len(docs) < 10000
    assert 5_000_000 < sum(lengths) < 25_000_000
    assert lengths[0] >= 100 and 1000 < sum(lengths) / len(lengths) < 8000
    assert sum(200 <= n <= 20000 for n in lengths) > 0.95 * len(docs)  # mostly mid-sized, some long
    joined = "\n".join(docs)
    assert joined.count(" the ") > len(joined) / 400  # English: ~1 per 160 chars here
    assert sum(" the " in d or " a " in d for d in docs) > 0.9 * len(docs)
    prose = "\n".join(l for l in joined.splitlines() if not l.lstrip().startswith("|"))  # grid tables are kept raw
    for noise in (".. index::", ".. versionadded::", ":func:`", ":class:`", ".. _"):  # reST markup was stripped
        assert prose.count(noise) < 5, noise
    assert "json.dumps" in joined and "Changed in version" in joined  # code and version notes are kept


def test_shards_layout(shards, docs):
    assert [p.name for p in shards] == [f"shard_{i:05d}.parquet" for i in range(9)]
    for path in shards:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.names == ["text"] and str(pf.schema_arrow.field("text").type) == "string"
        assert pf.metadata.num_row_groups > 1  # so DDP ranks can each take row groups of even a small shard
        assert max(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)) \
            == corpus.ROW_GROUP_DOCS
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert not [p for p in shards[0].parent.iterdir() if p.name.endswith(".tmp")]
    manifest = json.loads((shards[0].parent / corpus.MANIFEST).read_text())
    assert manifest["corpus_sha256"] == corpus.EMBEDDED_SHA256 and manifest["val_shard"] == shards[-1].name


def test_last_shard_is_a_disjoint_val_split(shards, docs):
    train = [t for p in shards[:-1] for t in texts(p)]
    val = texts(shards[-1])
    assert sorted(train + val) == sorted(docs)  # every doc exactly once
    assert not set(train) & set(val)
    assert corpus.MIN_VAL_DOCS <= len(val) <= 0.1 * len(docs)
    assert val == docs[-len(val):]
    sizes = [len(texts(p)) for p in shards[:-1]]
    assert max(sizes) - min(sizes) <= 1


def test_materialize_is_deterministic(shards, tmp_path):
    again = corpus.materialize(tmp_path / "again")
    assert [p.name for p in again] == [p.name for p in shards]
    for a, b in zip(shards, again):
        assert texts(a) == texts(b)


def test_materialize_is_idempotent_and_repairs(tmp_path):
    dest = tmp_path / "embedded"
    paths = corpus.materialize(dest, num_train_shards=3)
    stamps = {p: p.stat().st_mtime_ns for p in [*paths, dest / corpus.MANIFEST]}
    assert corpus.materialize(dest, num_train_shards=3) == paths
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    paths[1].unlink()  # an incomplete folder is rebuilt
    assert corpus.materialize(dest, num_train_shards=3) == paths and paths[1].is_file()
    val = texts(paths[-1])
    fewer = corpus.materialize(dest, num_train_shards=1)  # a different split drops the old shards
    assert sorted(dest.glob("*.parquet")) == fewer == [dest / "shard_00000.parquet", dest / "shard_00001.parquet"]
    assert texts(fewer[-1]) == val  # val is the same docs whatever the train shard count


def test_stale_manifest_from_another_corpus_is_rebuilt(tmp_path, monkeypatch):
    dest = tmp_path / "embedded"
    paths = corpus.materialize(dest, num_train_shards=2)
    manifest = json.loads((dest / corpus.MANIFEST).read_text())
    (dest / corpus.MANIFEST).write_text(json.dumps({**manifest, "corpus_sha256": "0" * 64}))
    shutil.copy(paths[0], paths[1])  # stale content that only a rebuild fixes
    corpus.materialize(dest, num_train_shards=2)
    assert texts(paths[1]) != texts(paths[0])
    assert json.loads((dest / corpus.MANIFEST).read_text())["corpus_sha256"] == corpus.EMBEDDED_SHA256


def test_bad_shard_count_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="num_train_shards must be at least 1"):
        corpus.materialize(tmp_path, num_train_shards=0)
