import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_docs, write_shards
from nanochat.common import UserError
from nanochat.dataloader import IGNORE_INDEX, conversation_loader, pretraining_loader

B, T = 4, 64
UPSTREAM_FIXTURE = Path(__file__).parent / "fixtures" / "upstream"  # made by make_golden.py there


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "data", synthetic_docs(600, seed=2), n_shards=3, rows_per_group=16)


def take(loader, n):
    out = [(x.clone(), y.clone(), s) for x, y, s in itertools.islice(loader, n)]
    loader.close()
    return out


def reference_rows(tokenizer, row_groups, capacity, buffer_size, batch_size, n_rows):
    """Upstream's best-fit, written the obvious way: before each pick, while the list buffer holds fewer than
    buffer_size documents, append the next tokenizer batch (rows [0:batch_size], [batch_size:2*batch_size], ... of
    one row group); place the first of the longest documents that fit, else crop the first of the shortest."""
    batches = iter([texts[i:i + batch_size] for texts in row_groups for i in range(0, len(texts), batch_size)])
    buf, rows = [], []
    for _ in range(n_rows):
        row = []
        while len(row) < capacity:
            while len(buf) < buffer_size:
                buf += tokenizer.encode(next(batches), prepend=tokenizer.get_bos_token_id())
            room = capacity - len(row)
            fits = [i for i, d in enumerate(buf) if len(d) <= room]
            if fits:
                best = max(len(buf[i]) for i in fits)
                row += buf.pop(next(i for i in fits if len(buf[i]) == best))
            else:
                shortest = min(len(d) for d in buf)
                row += buf.pop(next(i for i, d in enumerate(buf) if len(d) == shortest))[:room]
        rows.append(row)
    return rows


def test_rows_match_reference_best_fit(small_tokenizer, shards):
    """Batches of 6 in row groups of 16 rows: the buffer grows by 6, 6 and 4 documents, never across a row group."""
    import pyarrow.parquet as pq
    row_groups = [pq.ParquetFile(p).read_row_group(rg).column("text").to_pylist()
                  for p in shards for rg in range(pq.ParquetFile(p).num_row_groups)]
    loader = pretraining_loader(small_tokenizer, shards, B, T, buffer_size=50, tokenizer_batch_size=6)
    got = take(loader, 6)
    rows = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y, _ in got])
    expected = reference_rows(small_tokenizer, row_groups, T + 1, 50, 6, len(rows))
    assert rows.tolist() == expected
    bos = small_tokenizer.get_bos_token_id()
    assert (rows[:, 0] == bos).all()  # BOS-aligned
    x, y, _ = got[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one, no padding


def test_same_batches_as_upstream():
    """Upstream's own loader made golden_batches.npz from this fixture (B=4, T=64, buffer 1000, batches of 128 rows);
    ours makes the same rows, from the first batch through a shard boundary and into the second epoch, and again
    when resumed half-way."""
    from nanochat.tokenizer import Tokenizer

    golden = np.load(UPSTREAM_FIXTURE / "golden_batches.npz")
    expected, upstream_states = torch.from_numpy(golden["rows"].astype(np.int64)), golden["upstream_states"]
    assert (upstream_states[:, 0] == 1).any() and upstream_states[-1, 2] == 2  # shard 1 was read, then epoch 2
    tokenizer = Tokenizer.load(UPSTREAM_FIXTURE / "tokenizer")
    train = sorted(UPSTREAM_FIXTURE.glob("shard_*.parquet"))[:-1]
    got = take(pretraining_loader(tokenizer, train, B, T), len(expected))
    assert torch.equal(torch.stack([torch.cat([x, y[:, -1:]], dim=1) for x, y, _ in got]), expected)
    half = len(expected) // 2
    resumed = take(pretraining_loader(tokenizer, train, B, T, state=got[half - 1][2]), len(expected) - half)
    assert torch.equal(torch.stack([torch.cat([x, y[:, -1:]], dim=1) for x, y, _ in resumed]), expected[half:])


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_exact_per_rank(small_tokenizer, shards, monkeypatch, world_size):
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        full = take(pretraining_loader(small_tokenizer, shards, B, T, buffer_size=40), 30)
        for k in (0, 7, 21):  # stop after batch k, restore from its state: batches k+1.. are identical
            resumed = take(pretraining_loader(small_tokenizer, shards, B, T, buffer_size=40, state=full[k][2]), 8)
            for (x1, y1, s1), (x2, y2, s2) in zip(full[k + 1:], resumed):
                assert torch.equal(x1, x2) and torch.equal(y1, y2) and s1 == s2
        assert list(full[0][2]["shards"]) == [rank] and full[0][2]["data_shards"] == world_size


def test_ranks_read_disjoint_row_groups(small_tokenizer, shards, monkeypatch):
    firsts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        x, _, _ = take(pretraining_loader(small_tokenizer, shards, 1, 16, buffer_size=1), 1)[0]
        firsts.append(small_tokenizer.decode(x[0].tolist()))
    # one buffer refill is the rank's first row group (16 rows): rank 0 reads docs 0-15, rank 1 docs 16-31
    doc = [int(text.removeprefix("<|bos|>Doc ").split(":")[0]) for text in firsts]
    assert doc[0] in range(0, 16) and doc[1] in range(16, 32)


def test_runs_past_the_end_of_the_data(small_tokenizer, tmp_path):
    shards = write_shards(tmp_path / "tiny", synthetic_docs(20, seed=3), n_shards=1, rows_per_group=8)
    batches = take(pretraining_loader(small_tokenizer, shards, 2, 128, buffer_size=5), 40)  # several epochs
    assert batches[-1][2]["shards"][0]["next_k"] > 3 * 20


def test_state_from_another_world_size_is_refused(small_tokenizer, shards, monkeypatch):
    state = take(pretraining_loader(small_tokenizer, shards, B, T), 1)[0][2]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="data_shards=1 but this run has data_shards=2"):
        pretraining_loader(small_tokenizer, shards, B, T, state=state)


def test_one_process_with_two_data_shards_sees_what_two_ranks_see(small_tokenizer, shards, monkeypatch):
    """The global batch does not depend on the world size once data_shards is fixed."""
    single = take(pretraining_loader(small_tokenizer, shards, B, T, data_shards=2), 6)  # shards 0,1,0,1,...
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ranked = take(pretraining_loader(small_tokenizer, shards, B, T), 3)
        for (x1, y1, _), (x2, y2, _) in zip(single[rank::2], ranked):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    state = single[2][2]  # a single process resumes its two shards mid-way, including whose turn it is
    resumed = take(pretraining_loader(small_tokenizer, shards, B, T, data_shards=2, state=state), 3)
    for (x1, _, _), (x2, _, _) in zip(single[3:], resumed):
        assert torch.equal(x1, x2)


def test_crop_fraction_is_measured(small_tokenizer, shards):
    loader = pretraining_loader(small_tokenizer, shards, B, T)
    take(loader, 5)
    assert 0.0 < loader.crop_fraction < 1.0


def chats(n):
    return [{"messages": [{"role": "user", "content": f"question {i} " + "word " * (i % 13)},
                          {"role": "assistant", "content": f"answer {i} " + "yes " * (i % 7)}]} for i in range(n)]


def test_conversation_loader_masks_pads_and_resumes(small_tokenizer):
    tok, task = small_tokenizer, chats(90)
    full = take(conversation_loader(tok, task, 2, 96, buffer_size=8), 12)
    assistant_end = tok.encode_special("<|assistant_end|>")
    for x, y, _ in full:
        supervised = y[y != IGNORE_INDEX]
        assert len(supervised) > 0 and (y == IGNORE_INDEX).any()
        assert assistant_end in supervised.tolist() and tok.get_bos_token_id() not in supervised.tolist()
        assert (x[:, 0] == tok.get_bos_token_id()).all()
    # each supervised span decodes to whole answers: no conversation is cut to fill a row
    text = tok.decode([t for x, y, _ in full for t in y[y != IGNORE_INDEX].tolist()])
    assert all(piece.startswith("answer ") for piece in text.split("<|assistant_end|>")[:-1])
    resumed = take(conversation_loader(tok, task, 2, 96, buffer_size=8, state=full[4][2]), 7)
    for (x1, y1, _), (x2, y2, _) in zip(full[5:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
