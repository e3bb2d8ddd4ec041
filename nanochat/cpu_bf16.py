"""Whether this CPU should train in bf16: only where it multiplies bf16 in hardware and that is measured faster.

Without native bf16 (x86 before AVX512-BF16/AMX, e.g. AVX2-only CPUs) torch converts and multiplies in software:
a bf16 matmul ran at 1.1 GFLOP/s against 58.9 for fp32 on such a 2-core CPU, and upstream's bf16 run there did not
reach its first step in 15 minutes. With it, upstream's bf16 ran 2.6x its fp32 (1,870 vs 718 tok/s).
"""

import functools
import re
import time
from pathlib import Path

import torch

# the CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") that mean bf16 dot products in hardware
NATIVE_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no claim of native bf16
        return False
    lines = re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
    return bool(lines) and bool(NATIVE_FLAGS & set(lines[0].split()))


def matmul_seconds(dtype: torch.dtype, n: int = 768, repeats: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: the first call picks and initialises the kernel
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - start) / repeats


@functools.cache
def bf16_pays() -> bool:
    """Native bf16, and a bf16 matmul at least 1.2x faster than fp32's here (a ~0.1 s probe, once per process)."""
    return native_bf16() and matmul_seconds(torch.float32) >= 1.2 * matmul_seconds(torch.bfloat16)
