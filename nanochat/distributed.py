"""Device, dtype and process-group set-up.

A process learns its rank from nanochat.world (torch-free, for the login node): torchrun's variables, or Slurm's
in a task that `srun` started; a batch or salloc shell is no rank of its allocation's world (there `nproc=N`
starts N local ranks). When the world should have more than one rank, a failed rendezvous is an error: never a
silent single-rank run that trains the wrong thing on 64 GPUs.
"""

import datetime
import functools
import os
import re
import sys

import torch

from nanochat.common import UserError
from nanochat.world import World, discover_world, rendezvous_address

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A dead peer fails a collective after this long instead of hanging the job until its time limit; the watchdog
# (nanochat.watchdog), when on, fires first and lets the job be requeued.
PROCESS_GROUP_TIMEOUT_S = float(os.environ.get("NANOCHAT_PG_TIMEOUT_S", "600"))


def autodetect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_dtype(device_type: str) -> tuple[torch.dtype, str]:
    """bf16 on SM >= 80; fp16 (with a GradScaler) on older GPUs such as V100 and T4; on a CPU bf16 where it is native
    (nanochat.cpu_bf16), else fp32, as on MPS. NANOCHAT_DTYPE=bfloat16|float16|float32
    overrides (bf16 forced on a CPU without it: a warning, since it runs many times slower there)."""
    from nanochat import cpu_bf16

    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        if override not in DTYPES:
            raise UserError(f"NANOCHAT_DTYPE={override!r}; valid: {', '.join(DTYPES)}")
        if override == "bfloat16" and device_type == "cpu" and not cpu_bf16.native_bf16():
            warn_once("warning: NANOCHAT_DTYPE=bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): "
                      "torch emulates it, ~50x slower than fp32 matmuls")
        return DTYPES[override], f"NANOCHAT_DTYPE={override}"
    if device_type == "cpu" and cpu_bf16.native_bf16():
        return torch.bfloat16, "cpu: native bf16 (AVX512-BF16/AMX)"
    if device_type != "cuda":
        return torch.float32, f"{device_type}: fp32"
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        return torch.bfloat16, f"SM{major}{minor} has bf16"
    return torch.float16, f"SM{major}{minor} has no bf16: fp16 with loss scaling"


@functools.cache
def warn_once(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def init_distributed(device_type: str, startup_timeout_s: float = 0.0, step_timeout_s: float = 0.0
                     ) -> tuple[World, torch.device]:
    """Join the process group when there is more than one rank; returns the world and this rank's device. With
    more than one rank, the watchdog ends a rank that makes no progress within the timeouts (0 = no limit)."""
    import torch.distributed as dist

    from nanochat.watchdog import WATCHDOG

    world = discover_world()
    device = torch.device(device_type)
    if device_type == "cuda":
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world.world_size > 1 and not dist.is_initialized():
        addr = rendezvous_address(world)
        os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size), LOCAL_RANK=str(world.local_rank),
                          MASTER_ADDR=addr, MASTER_PORT=str(world.master_port))
        backend = "nccl" if device_type == "cuda" else "gloo"
        WATCHDOG.start(startup_timeout_s, step_timeout_s)
        timeout = max([PROCESS_GROUP_TIMEOUT_S] + [t + 60 for t in (startup_timeout_s, step_timeout_s) if t > 0])
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout),
                                device_id=device if device_type == "cuda" else None)
        if dist.get_world_size() != world.world_size:
            raise RuntimeError(f"rendezvous gave {dist.get_world_size()} ranks, expected {world.world_size}")
        if backend == "nccl":
            global _CONTROL_GROUP
            _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    return world, device


# The small all-reduces whose result the host reads (agree, max_across_ranks, sum_across_ranks) go between the
# CPUs over gloo: over NCCL, reading the result would wait for all the GPU work queued before it (a host-device sync
# every step). None: the default group is gloo already (CPU ranks), or there is one rank.
_CONTROL_GROUP = None


def _all_reduce(values: list[float], op_name: str, dtype) -> list:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    from nanochat.watchdog import WATCHDOG

    tensor = torch.tensor(values, dtype=dtype)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name), group=_CONTROL_GROUP)
    values = tensor.tolist()
    WATCHDOG.beat()  # every step and evaluation batch agrees on a flag: this rank is alive and its peers too
    return values


def agree(*flags: bool) -> list[bool]:
    """At a step boundary, every rank learns whether any rank raised each flag (one small all-reduce)."""
    return [bool(v) for v in _all_reduce([int(f) for f in flags], "MAX", torch.int64)]


def max_across_ranks(*values: int) -> list[int]:
    return [int(v) for v in _all_reduce([int(v) for v in values], "MAX", torch.int64)]


def sum_across_ranks(*values: float) -> list[float]:
    """Counts and totals summed over the ranks (one small all-reduce, in float64 so counts stay exact)."""
    return _all_reduce([float(v) for v in values], "SUM", torch.float64)


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor = tensor / dist.get_world_size()
    return tensor


def cleanup_distributed() -> None:
    import torch.distributed as dist

    from nanochat.watchdog import WATCHDOG

    global _CONTROL_GROUP
    WATCHDOG.stop()
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the control group too
    _CONTROL_GROUP = None


# Per GPU, from NVIDIA's datasheets: dense peak FLOP/s (no sparsity) in bf16, fp16 on V100/T4 (no bf16 there),
# for MFU; and peak memory bandwidth in bytes/s, for the roofline of memory-bound work (decoding).
# Each row: the tokens a device name must all contain, the most specific rows first ("H100 NVL" before "H100").
# Tokens, not substrings, so that "A10" is not taken for an A100 nor for an A10G, nor "L4" for an L40S.
PEAKS = [
    (("b200",), 2.25e15, 8.0e12),
    (("h200", "nvl"), 835e12, 4.8e12),
    (("h200",), 989e12, 4.8e12),  # SXM
    (("h100", "nvl"), 835e12, 3.9e12),
    (("h100", "pcie"), 756e12, 2.0e12),
    (("h100",), 989e12, 3.35e12),  # SXM, "NVIDIA H100 80GB HBM3"
    (("a100", "40gb"), 312e12, 1.555e12),  # SXM4 and PCIe
    (("a100", "pcie"), 312e12, 1.935e12),  # 80GB PCIe
    (("a100",), 312e12, 2.039e12),  # 80GB SXM4
    (("l40s",), 362e12, 864e9),
    (("l4",), 121e12, 300e9),
    (("a10",), 125e12, 600e9),
    (("v100s",), 130e12, 1.134e12),
    (("v100", "pcie"), 112e12, 900e9),
    (("v100",), 125e12, 900e9),  # SXM2
    (("t4",), 65e12, 320e9),
    (("4090",), 165e12, 1.008e12),
    (("3090",), 71e12, 936e9),
]


def _peaks(device_name: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of the first row whose tokens all occur in the device name; None for an unknown GPU."""
    tokens = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    return next(((flops, bandwidth) for names, flops, bandwidth in PEAKS if tokens.issuperset(names)), None)


def peak_flops(device_name: str) -> float | None:
    """Dense peak FLOP/s of a GPU by its torch.cuda.get_device_name; None where unknown, so that MFU is reported
    as unknown rather than as a made-up number."""
    peaks = _peaks(device_name)
    return None if peaks is None else peaks[0]


def peak_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth (bytes/s) of a GPU by its torch.cuda.get_device_name; None where unknown."""
    peaks = _peaks(device_name)
    return None if peaks is None else peaks[1]
