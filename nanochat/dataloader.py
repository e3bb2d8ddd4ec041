"""Dataloaders for pretraining and chat fine-tuning: BOS-aligned best-fit packing that resumes exactly.

The data is cut into virtual data shards (by default one per rank; see ShardedLoader). Data shard s of S reads its
own stream of documents: row groups s, s+S, s+2S, ... of each parquet file, file after file, epoch after epoch.
Document k of that stream is addressable, so a shard's state after a batch is just "the next k to read" plus
"the k of each document still buffered" (a few KB). Restoring re-reads and
re-tokenizes the buffered documents, and the batches that follow are equal bit for bit to an uninterrupted run.

Packing (as upstream nanochat, batch for batch: tests/test_dataloader.py checks a golden file made by upstream's
loader): each row of T+1 tokens starts at a document start (so every token sees its document's BOS); we
repeatedly place the longest buffered document that fits, and when none fits we crop the shortest one to fill the
row exactly (pretraining: no padding, the cropped tail is dropped) or pad the row (chat: a conversation is never
cut to fill a row; padded targets are -1). Among equal lengths the document read first wins. Before each pick,
while fewer than buffer_size documents are buffered, a whole tokenizer batch is added: pretraining's is the next
128 rows of the current row group (the last batch of a row group may be shorter; none spans two row groups), so
the buffer holds buffer_size to buffer_size + 127 documents; chat's is one conversation.
"""

import bisect
import hashlib
import queue
import threading

import numpy as np
import pyarrow.parquet as pq
import torch

from nanochat.common import UserError, get_dist_info
from nanochat.fused_loss import IGNORE_INDEX  # the targets of padding, prompt and tool-output tokens
TOKENIZER_BATCH_SIZE = 128  # pretraining documents tokenized together, and added to the buffer together (upstream's)


# -- document sources: the k-th document of a rank's stream, tokenized -----------------------------------------
class ParquetDocuments:
    """Pretraining text from parquet shards (a `text` column), sharded across ranks by row group."""

    channels = 1  # a document is one row of token ids

    def __init__(self, files, tokenizer, rank: int, world_size: int, threads: int = 4,
                 batch_size: int = TOKENIZER_BATCH_SIZE):
        self.files, self.tokenizer, self.threads = [str(f) for f in files], tokenizer, threads
        self.batch_size = batch_size
        self.units = []  # (file index, row group, rows) in this rank's order within one epoch
        for i, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            self.units += [(i, rg, meta.row_group(rg).num_rows) for rg in range(rank, meta.num_row_groups, world_size)]
        self.unit_starts = np.cumsum([0] + [rows for _, _, rows in self.units]).tolist()
        self.epoch_len = self.unit_starts[-1]
        if self.epoch_len == 0:
            raise UserError(f"data shard {rank} of {world_size} gets no data: the parquet files have fewer row "
                            f"groups than data shards (ranks)")
        fingerprint = repr([(path.rsplit("/", 1)[-1], unit) for path, unit in zip(self.files, self.units)])
        self.fingerprint = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self._open: dict[int, pq.ParquetFile] = {}
        self._cached_unit = (-1, None)  # consecutive reads hit the same row group: keep the last one decoded

    def _texts(self, unit: int) -> list[str]:
        if self._cached_unit[0] != unit:
            file_idx, rg, _ = self.units[unit]
            if file_idx not in self._open:
                self._open[file_idx] = pq.ParquetFile(self.files[file_idx])
            texts = self._open[file_idx].read_row_group(rg, columns=["text"]).column("text").to_pylist()
            self._cached_unit = (unit, texts)
        return self._cached_unit[1]

    def _locate(self, k: int) -> tuple[int, int]:
        """(unit, row within it) of document k."""
        offset = k % self.epoch_len
        unit = bisect.bisect_right(self.unit_starts, offset) - 1
        return unit, offset - self.unit_starts[unit]

    def batch_end(self, k: int) -> int:
        """The k after the tokenizer batch that holds document k: batches are rows [0:128], [128:256], ... of one
        row group, as upstream slices them."""
        unit, row = self._locate(k)
        return k - row + min(self.units[unit][2], (row // self.batch_size + 1) * self.batch_size)

    def get(self, ks: list[int]) -> list[np.ndarray]:
        texts = []
        for k in ks:
            unit, row = self._locate(k)
            texts.append(self._texts(unit)[row])
        rows = self.tokenizer.encode(texts, prepend=self.tokenizer.get_bos_token_id(), num_threads=self.threads)
        return [np.asarray(row, dtype=np.int32)[None, :] for row in rows]


class ConversationDocuments:
    """Chat conversations from a task (anything with len() and [i] -> {"messages": [...]}), rendered with their
    loss mask; rank r reads conversations r, r+W, ..."""

    channels = 2  # token ids and the loss mask

    def __init__(self, task, tokenizer, rank: int, world_size: int, max_tokens: int):
        self.task, self.tokenizer, self.max_tokens = task, tokenizer, max_tokens
        self.rank, self.world_size = rank, world_size
        self.epoch_len = len(range(rank, len(task), world_size))
        if self.epoch_len == 0:
            raise UserError(f"data shard {rank} of {world_size} gets no conversations: the task has only {len(task)}")
        self.fingerprint = f"{type(task).__name__}:{len(task)}"

    def batch_end(self, k: int) -> int:
        return k + 1  # conversations are rendered one by one: the buffer is topped up to exactly buffer_size

    def get(self, ks: list[int]) -> list[np.ndarray]:
        docs = []
        for k in ks:
            ids, mask = self.tokenizer.render_conversation(
                self.task[self.rank + self.world_size * (k % self.epoch_len)], max_tokens=self.max_tokens)
            docs.append(np.array([ids, mask], dtype=np.int32))
        return docs


# -- the packer ---------------------------------------------------------------------------------------------
class BestFitPacker:
    """Keeps at least `buffer_size` tokenized documents, sorted by (length, k), and fills rows from them."""

    def __init__(self, source, capacity: int, buffer_size: int, crop: bool, next_k: int = 0, buffered=()):
        self.source, self.capacity, self.buffer_size, self.crop = source, capacity, buffer_size, crop
        self.next_k = next_k  # the next document this packer takes from the stream
        self.keys: list[tuple[int, int]] = []  # (length, k), sorted
        self.docs: dict[int, np.ndarray] = {}
        for k, doc in zip(buffered, source.get(list(buffered))):
            self._add(k, doc)
        self.tokens_taken = self.tokens_cropped = 0

    def state(self) -> dict:
        return {"next_k": self.next_k, "buffered": sorted(k for _, k in self.keys)}

    def _add(self, k: int, doc: np.ndarray) -> None:
        bisect.insort(self.keys, (doc.shape[1], k))
        self.docs[k] = doc

    def _refill(self) -> None:
        # Whole tokenizer batches: next_k then always sits at a batch start, so {next_k, buffered} stays the whole
        # state (a state saved mid-batch, by an older version, reads the rest of that batch first).
        while len(self.keys) < self.buffer_size:
            ks = list(range(self.next_k, self.source.batch_end(self.next_k)))
            for k, doc in zip(ks, self.source.get(ks)):
                self._add(k, doc)
            self.next_k = ks[-1] + 1

    def _take(self, room: int) -> np.ndarray | None:
        i = bisect.bisect_right(self.keys, (room, float("inf"))) - 1
        if i >= 0:  # the longest document that fits; among equals the one read first, as upstream
            i = bisect.bisect_left(self.keys, (self.keys[i][0], -1))
        elif not self.crop:
            return None
        else:  # nothing fits: crop the shortest, which wastes the fewest tokens
            i = 0
        _, k = self.keys.pop(i)
        return self.docs.pop(k)

    def fill(self, row: np.ndarray, pad_id: int) -> None:
        """Fill row[:, :capacity] in place (row has one line per channel)."""
        pos = 0
        while pos < self.capacity:
            self._refill()
            doc = self._take(self.capacity - pos)
            if doc is None:  # chat: pad the rest; the mask channel is 0 there, so no loss is taken
                row[0, pos:] = pad_id
                row[1:, pos:] = 0
                return
            n = min(doc.shape[1], self.capacity - pos)
            row[:, pos:pos + n] = doc[:, :n]
            self.tokens_taken += doc.shape[1]
            self.tokens_cropped += doc.shape[1] - n
            pos += n


# -- the loader ---------------------------------------------------------------------------------------------
class PackedLoader:
    """One data shard's batches: iterate to get (rows, state) forever; `state` resumes right after that batch.

    Reading, tokenizing and packing run in a background thread that stays `prefetch` batches ahead, so the
    training step never waits on them; on CUDA the batch is pinned there and copied without blocking.
    """

    def __init__(self, source, B: int, T: int, *, crop: bool, pad_id: int, pin: bool, state=None,
                 buffer_size: int = 1000, prefetch: int = 4):
        if state is not None and state.get("data") != source.fingerprint:
            raise UserError("the data changed since this dataloader state was saved (other shards or row groups); "
                            "resume with the same data, or start a new run")
        self.source = source
        self.packer = BestFitPacker(source, T + 1, buffer_size, crop,
                                    next_k=state["next_k"] if state else 0,
                                    buffered=state["buffered"] if state else ())
        self.B, self.T, self.pad_id, self.pin = B, T, pad_id, pin
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True, name="dataloader")
        self.thread.start()

    def _produce(self) -> None:
        try:
            while not self.stopped.is_set():
                rows = np.empty((self.source.channels, self.B, self.T + 1), dtype=np.int32)
                for b in range(self.B):
                    self.packer.fill(rows[:, b], self.pad_id)
                batch = torch.from_numpy(rows).long()
                state = {**self.packer.state(), "data": self.source.fingerprint}
                item = (batch.pin_memory() if self.pin else batch, state)
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced in the training thread, which owns error handling
            self.queue.put(exc)

    def __next__(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


class ShardedLoader:
    """Iterate to get (inputs, targets, state) forever; `state` resumes right after that batch.

    The data is cut into `data_shards` virtual shards (default: one per rank), each a stream of its own whose rows
    depend on nothing else (not on the world size, nor on the device batch size: rows are packed one at a time);
    rank r reads shards r, r+W, ... in turn, one micro-batch each. With data_shards fixed, a global step reads the
    same micro-batches whatever the world size (check_data_shards): micro-batches [j*m, (j+1)*m) of each shard in
    step j, m = accum * W / data_shards; 1 process with 2 shards and 2 accumulation steps sees exactly what 2
    ranks see, so their loss curves agree to float tolerance. The state is each shard's position, so a job with
    another number of ranks resumes from the merged states of the old ranks (merge_loader_states).
    """

    def __init__(self, make_source, B: int, T: int, *, crop: bool, pad_id: int, device="cpu", state=None,
                 data_shards: int = 0, **kw):
        rank, _, world_size = get_dist_info()
        self.data_shards = data_shards or world_size
        if self.data_shards % world_size:
            raise UserError(f"data_shards={self.data_shards} is not a multiple of the world size {world_size}")
        if state is not None and state.get("data_shards") != self.data_shards:
            raise UserError(f"dataloader state was saved with data_shards={state.get('data_shards')} but this run "
                            f"has data_shards={self.data_shards} (world size {world_size}); resume with "
                            f"data_shards={state.get('data_shards')} on a world size that divides it, or start a "
                            f"new run")
        self.mine = list(range(rank, self.data_shards, world_size))
        states = {int(v): s for v, s in state["shards"].items()} if state else {}
        self.device = torch.device(device)
        self.loaders = {v: PackedLoader(make_source(v, self.data_shards), B, T, crop=crop, pad_id=pad_id,
                                        pin=self.device.type == "cuda", state=states.get(v), **kw)
                        for v in self.mine}
        self.states = {v: states.get(v) for v in self.mine}
        self.turn = state["turn"] if state else 0
        self.last_shard: int | None = None  # the virtual shard of the batch returned last

    def __iter__(self):
        return self

    def __next__(self):
        shard = self.last_shard = self.mine[self.turn]
        rows, self.states[shard] = next(self.loaders[shard])
        self.turn = (self.turn + 1) % len(self.mine)
        rows = rows.to(self.device, non_blocking=True)
        inputs, targets = rows[0, :, :-1], rows[0, :, 1:]
        if rows.shape[0] == 2:  # chat: only supervised tokens are targets
            targets = targets.masked_fill(rows[1, :, 1:] == 0, IGNORE_INDEX)
        state = {"data_shards": self.data_shards, "turn": self.turn, "shards": dict(self.states)}
        return inputs, targets, state

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()

    @property
    def crop_fraction(self) -> float:
        """Share of the tokens read that were cropped away (upstream measures ~35% at T=2048)."""
        packers = [loader.packer for loader in self.loaders.values()]
        return sum(p.tokens_cropped for p in packers) / max(1, sum(p.tokens_taken for p in packers))


def check_data_shards(data_shards: int, world_size: int, accum: int) -> None:
    """A rank reads whole virtual shards, one micro-batch from each in turn, so that a step reads the same rows
    whatever the world size: the ranks must divide the shards, and a rank's shards its accumulation steps (then
    every shard gives accum * world_size / data_shards micro-batches a step, which no world size changes)."""
    if data_shards % world_size:
        raise UserError(f"data_shards={data_shards} does not divide among {world_size} ranks; this run's world "
                        f"size must divide it")
    per_rank = data_shards // world_size
    if accum % per_rank:
        raise UserError(f"data_shards={data_shards} gives each of the {world_size} ranks {per_rank} data shards, "
                        f"which must divide its {accum} gradient-accumulation steps")


def merge_loader_states(states: list[dict]) -> dict:
    """One ShardedLoader state from those of all the ranks that saved it, for a job with another number of ranks:
    each virtual shard's position, as the one rank that read it left it. Its turn is 0: at a step boundary every
    rank has read as many micro-batches from each of its shards (check_data_shards)."""
    shards = {}
    for state in states:
        shards.update(state["shards"])
    return {"data_shards": states[0]["data_shards"], "turn": 0, "shards": shards}


def pretraining_loader(tokenizer, files, B: int, T: int, device="cpu", state=None, threads: int = 4,
                       data_shards: int = 0, tokenizer_batch_size: int = TOKENIZER_BATCH_SIZE, **kw):
    def source(shard, shards):
        return ParquetDocuments(files, tokenizer, shard, shards, threads=threads, batch_size=tokenizer_batch_size)

    return ShardedLoader(source, B, T, crop=True, pad_id=tokenizer.get_bos_token_id(), device=device, state=state,
                         data_shards=data_shards, **kw)


def conversation_loader(tokenizer, task, B: int, T: int, device="cpu", state=None, data_shards: int = 0, **kw):
    def source(shard, shards):
        return ConversationDocuments(task, tokenizer, shard, shards, max_tokens=T + 1)

    return ShardedLoader(source, B, T, crop=False, pad_id=tokenizer.get_bos_token_id(), device=device, state=state,
                         data_shards=data_shards, **kw)
