"""Whether this CPU should train in bf16: only where it multiplies bf16 in hardware.

Without native bf16 (x86 before AVX512-BF16/AMX, e.g. AVX2-only CPUs) torch converts and multiplies in software:
a bf16 matmul ran at 1.1 GFLOP/s against 58.9 for fp32 on such a 2-core CPU, and upstream's bf16 run there did not
reach its first step in 15 minutes. With it, upstream's bf16 ran 2.6x its fp32 (1,870 vs 718 tok/s). The CPU's
flags decide, not a timed probe: every rank of a job on one kind of machine must make the same choice, and a probe
timed under load could differ between ranks.
"""

import functools
import re
from pathlib import Path

# the CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") that mean bf16 dot products in hardware
NATIVE_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no claim of native bf16
        return False
    lines = re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
    return bool(lines) and bool(NATIVE_FLAGS & set(lines[0].split()))
