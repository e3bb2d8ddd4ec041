"""`python -m experiments.bench reshard`: the time and peak memory of resuming on another number of ranks.

A d4 model (vocab 8192, as `bench checkpoint`) takes one optimizer step; its state is written as a checkpoint by
--written-by simulated ranks (one process: each rank's layout is the optimizer's with that rank and world size,
which is all the layout depends on; no process group is needed to write or read it). Then each rank of each
--to world size loads it in a fresh process, as a resuming rank does: CheckpointManager.load (verifies the old
ranks' files it is assigned, reads model.pt and the state files, maps the optimizer files), then
optim_state.restore (copies the slices it now owns). For the restore: its time, the bytes it copied, and the
peak resident memory it added (VmHWM reset through /proc/self/clear_refs), of which the resident pages of its
mappings of the checkpoint's files (/proc/self/smaps): clean page cache, which the kernel may map in larger
pieces than the slices read (on Linux 6.18 here, whole old files' worth: large page-cache folios).

d20 and d26 (upstream's vocabulary and context) are then computed, not run: each rank's share of the state from
the optimizer's own layout on the meta device, at the copy and hash throughputs just measured.
"""

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB, SEQ = 8192, 512


def build(depth: int, rank: int, world_size: int, device="cpu", vocab: int = VOCAB, seq: int = SEQ):
    """A model and its optimizer laid out as rank `rank` of `world_size` would have them."""
    import torch

    from nanochat.config import learning_rates
    from nanochat.gpt import GPT, model_config_for_depth
    from nanochat.optim import build_optimizer

    config = model_config_for_depth(depth, vocab, seq)
    with torch.device(device):
        model = GPT(config) if device == "meta" else GPT.build(config)
    optimizer = build_optimizer(model.param_groups(), d_model=config.n_embd, **learning_rates())
    optimizer.rank, optimizer.world_size = rank, world_size
    return model, optimizer, {p: name for name, p in model.named_parameters()}


def write(folder: Path, depth: int, written_by: int, world_sizes: list[int]) -> None:
    import torch

    from nanochat.checkpoint import CheckpointManager, rng_state
    from nanochat.optim_state import pieces, restore

    torch.manual_seed(0)
    model, whole, names = build(depth, 0, 1)
    model(torch.randint(0, VOCAB, (1, 64)), torch.randint(0, VOCAB, (1, 64))).backward()
    whole.step()  # optimizer state exists only after a step
    for rank in reversed(range(written_by)):  # rank 0 last: it finalises the checkpoint
        _, optimizer, names_r = build(depth, rank, written_by)
        restore(optimizer, names_r, [pieces(whole, names)])  # this rank's slices of the whole state
        CheckpointManager(folder, rank, written_by).save(
            1, model.state_dict() if rank == 0 else None, pieces(optimizer, names_r), {"rng": rng_state()},
            {"counters": {}, "world_sizes": world_sizes})


def load(folder: Path, depth: int, rank: int, world_size: int) -> dict:
    """One resuming rank, in this (fresh) process: the figures as a dict. On one intra-op thread: on this busy
    2-core machine a second one made the copy 5x slower (623 ms against 111 ms for 76 MiB), which no GPU node's
    rank with cores of its own would see."""
    import torch

    from nanochat.checkpoint import CheckpointManager
    from nanochat.optim_state import restore

    torch.set_num_threads(1)

    model, optimizer, names = build(depth, rank, world_size)
    start = time.perf_counter()
    loaded = CheckpointManager(folder, rank, world_size).load()
    model.load_state_dict(loaded["model"])  # `loaded` stays alive: freed memory reused would hide the growth
    load_s = time.perf_counter() - start
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size
    before, mapped_before = _resident(), _mapped(folder)
    start = time.perf_counter()
    copied = restore(optimizer, names, loaded["optim"])
    restore_s = time.perf_counter() - start
    after = _resident()
    return {"rank": rank, "load_s": load_s, "restore_s": restore_s, "copied": copied,
            "peak_added": after["VmHWM"] - before["VmRSS"], "mapped_read": _mapped(folder) - mapped_before}


def _resident() -> dict:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def _mapped(folder: Path) -> int:
    """Resident bytes of this process's mappings of the checkpoint's files (the pages restore read)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = str(folder) in line
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def share_bytes(depth: int, rank: int, world_size: int, **shape) -> int:
    """The optimizer state bytes a rank holds, from the layout on the meta device (no memory)."""
    _, optimizer, _ = build(depth, rank, world_size, device="meta", **shape)
    return sum(flat.numel() * flat.element_size() for *_, flat in optimizer.owned_state(create=True))


def bench_reshard(args) -> None:
    from nanochat.storage import file_digest
    from nanochat.tokenizer import DEFAULT_VOCAB_SIZE

    targets = [int(w) for w in args.to.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write(folder, args.depth, args.written_by, sorted({*targets, args.written_by}))
        step_dir = next(folder.glob("step_*"))
        optim_files = sorted(step_dir.glob("optim_rank*.pt"))
        state = sum(f.stat().st_size for f in optim_files)
        start = time.perf_counter()
        for f in optim_files:
            file_digest(f)
        hash_rate = state / (time.perf_counter() - start)
        whole = share_bytes(args.depth, 0, 1)
        print(f"reshard  d{args.depth} (vocab {VOCAB}): optimizer state {whole / 2**20:.1f} MiB, written by "
              f"{args.written_by} ranks ({state / 2**20:.1f} MiB in {len(optim_files)} files); per resuming rank:")
        rates = []
        for world_size in targets:
            rows = [json.loads(subprocess.run(
                [sys.executable, "-m", "experiments.bench_reshard", str(folder), str(args.depth), str(rank),
                 str(world_size)], check=True, capture_output=True, text=True).stdout) for rank in range(world_size)]
            worst = max(rows, key=lambda r: r["peak_added"])
            rates += [r["copied"] / r["restore_s"] for r in rows]
            print(f"  on {world_size}: restore {1000 * max(r['restore_s'] for r in rows):.0f} ms (slowest rank), "
                  f"copied {max(r['copied'] for r in rows) / 2**20:.1f} MiB; peak added "
                  f"{worst['peak_added'] / 2**20:.1f} MiB (of which checkpoint pages mapped "
                  f"{worst['mapped_read'] / 2**20:.1f}) = "
                  f"{worst['peak_added'] / whole:.2f} x the whole state; checkpoint load before it "
                  f"{1000 * max(r['load_s'] for r in rows):.0f} ms")
    copy_rate = min(rates)
    print(f"  copy throughput (slowest rank) {copy_rate / 2**30:.2f} GiB/s, xxh3 {hash_rate / 2**30:.2f} GiB/s")
    upstream = {"vocab": DEFAULT_VOCAB_SIZE, "seq": 2048}
    for depth in (20, 26):
        whole = share_bytes(depth, 0, 1, **upstream)
        for old, new in ((8, 4), (8, 16), (16, 8)):
            share = max(share_bytes(depth, r, new, **upstream) for r in range(new))
            verify = whole / old * -(-old // new)  # a new rank hashes the files of ceil(old/new) old ranks
            # mapped: at most the old files its slices fall in (ceil(old/new), one more where they straddle), which
            # the kernel may map whole (clean page cache, reclaimable; measured above at d4)
            mapped = whole / old * min(old, -(-old // new) + 1)
            print(f"  d{depth} ({whole / 2**30:.1f} GiB of optimizer state) {old} -> {new} ranks: a rank holds "
                  f"{share / 2**30:.2f} GiB, peak added <= {(share + mapped) / 2**30:.2f} GiB (its state + mapped "
                  f"checkpoint pages); ~{share / copy_rate + verify / hash_rate:.0f} s (copy + verify)")


if __name__ == "__main__":  # one resuming rank, for bench_reshard
    folder, depth, rank, world_size = sys.argv[1:]
    print(json.dumps(load(Path(folder), int(depth), int(rank), int(world_size))))
