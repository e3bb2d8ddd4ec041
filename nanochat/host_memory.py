"""The C heap's free pages handed back to the OS between CPU training steps, once there are many of them.

torch's CPU tensors come from glibc's malloc, whose heap keeps the pages of freed blocks: a step's activations,
freed in backward, leave holes that the next step's do not fill exactly, so the process's resident memory grows
past what is live. Measured on issue 19's d6 config in bf16 (2-core Xeon, compiled): 1.86 GiB free in the heap
after 6 steps against 0.49 GiB in use, and a peak RSS of 3.06-3.32 GiB over 10 steps; trimmed after every step,
2.58-2.65 GiB. Trimming has a price, the next step faulting those pages in again: on the embedded default (d4),
whose heap holds 0.33-0.44 GiB free after a step, trimming every step cost ~5% of base_train's tok/s. So the heap
is trimmed only when it holds more than FREE_HEAP_KEPT. GPU memory comes from torch's caching allocator instead.
"""

import ctypes
import ctypes.util
import functools

FREE_HEAP_KEPT = 512 * 2**20  # bytes of free heap kept between steps (the embedded default's steps stay under)


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+)
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _glibc() -> tuple:
    """(malloc_trim, mallinfo2), both None where the C library lacks either (macOS, musl, glibc before 2.33): there
    the free heap cannot be read, and trimming blind after every step would cost the small runs their ~5%."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None, None
    trim, info = getattr(libc, "malloc_trim", None), getattr(libc, "mallinfo2", None)
    if trim is None or info is None:
        return None, None
    trim.argtypes, trim.restype, info.restype = [ctypes.c_size_t], ctypes.c_int, _MallInfo2
    return trim, info


def free_heap_bytes() -> int | None:
    """The bytes free in malloc's heaps (the main arena and the threads'), None where glibc cannot tell."""
    info = _glibc()[1]
    return None if info is None else info().fordblks


def trim_heap(keep: int = FREE_HEAP_KEPT) -> bool:
    """malloc_trim(0) when more than `keep` bytes are free in the heap; whether it trimmed (never where the free
    size cannot be read)."""
    trim = _glibc()[0]
    if trim is None or free_heap_bytes() <= keep:
        return False
    trim(0)
    return True
