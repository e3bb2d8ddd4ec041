"""nanochat.host_memory: freed heap pages below a live block go back to the OS when trimmed, and only when the
heap holds more free than it keeps."""

import os

import pytest

from nanochat.host_memory import free_heap_bytes, trim_heap

BLOCK, BLOCKS = 64 * 1024, 3200  # 200 MiB in blocks under glibc's mmap threshold: they come from the heap
FREED = BLOCK * BLOCKS


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or free_heap_bytes() is None,
                    reason="needs Linux's /proc and glibc 2.33+ (mallinfo2)")
def test_trim_heap_returns_freed_pages_only_past_what_it_keeps():
    blocks = [bytearray(BLOCK) for _ in range(BLOCKS)]  # zero-filled: every page resident
    keep = bytearray(BLOCK)  # above the others on the heap, so their pages cannot be trimmed from its top
    del blocks
    assert free_heap_bytes() >= FREED
    before = resident_bytes()
    assert not trim_heap(keep=free_heap_bytes())  # no more free than it keeps: left as it is
    assert before - resident_bytes() < FREED // 10
    assert trim_heap(keep=FREED // 2)
    released = before - resident_bytes()
    assert released > FREED // 2, f"{released / 2**20:.0f} MiB released of {FREED / 2**20:.0f}"
    assert len(keep) == BLOCK
