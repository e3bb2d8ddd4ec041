"""Device, dtype and process-group set-up: one place for how a process learns who it is.

A process finds its rank from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, in a
task that `srun` started (one per GPU), from Slurm's (nanochat.scheduler.SlurmJob: the task's rank, the number of
tasks, the rank on its node, the first host of the node list). A batch or salloc shell is no rank of its
allocation's world: there `nproc=N` starts N local ranks. When the world should have more than one rank, a failed
rendezvous is an error: never a silent single-rank run that trains the wrong thing on 64 GPUs.
"""

import datetime
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

import torch

from nanochat.common import UserError
from nanochat.scheduler import SlurmJob, first_host

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A dead peer fails a collective after this long instead of hanging the job until its time limit; the watchdog
# (nanochat.watchdog), when on, fires first and lets the job be requeued.
PROCESS_GROUP_TIMEOUT_S = float(os.environ.get("NANOCHAT_PG_TIMEOUT_S", "600"))
# A Slurm job's rendezvous port, from its job id: two jobs sharing a node do not collide, and it stays below
# Linux's ephemeral range (32768-60999), where an outgoing connection may already hold it
PORT_BASE, PORT_SPAN = 15000, 17000
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"
    nodes: int = 1


def autodetect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_dtype(device_type: str) -> tuple[torch.dtype, str]:
    """bf16 on SM >= 80; fp16 (with a GradScaler) on older GPUs such as V100 and T4; fp32 on CPU and MPS.
    NANOCHAT_DTYPE=bfloat16|float16|float32 overrides."""
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        if override not in DTYPES:
            raise UserError(f"NANOCHAT_DTYPE={override!r}; valid: {', '.join(DTYPES)}")
        return DTYPES[override], f"NANOCHAT_DTYPE={override}"
    if device_type != "cuda":
        return torch.float32, f"{device_type}: fp32"
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        return torch.bfloat16, f"SM{major}{minor} has bf16"
    return torch.float16, f"SM{major}{minor} has no bf16: fp16 with loss scaling"


def discover_world(env=os.environ) -> World:
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = int(env["WORLD_SIZE"])
        return World(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world_size,
                     env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
                     nodes=world_size // int(env.get("LOCAL_WORLD_SIZE", world_size)))
    slurm = SlurmJob.from_env(env)
    if slurm.in_step and (slurm.ntasks or 1) > 1 and slurm.procid is not None:
        port = int(env.get("MASTER_PORT", PORT_BASE + int(slurm.job_id or 0) % PORT_SPAN))
        addr = env.get("MASTER_ADDR") or first_host(slurm.nodelist or "127.0.0.1")
        return World(slurm.procid, slurm.localid or 0, slurm.ntasks, addr, port, "slurm", nodes=slurm.num_nodes or 1)
    return World(0, 0, 1, "127.0.0.1", 0, "single")


def interface_address(interface: str) -> str:
    """The IPv4 address of a network interface of this node (cluster.interface, e.g. ib0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError as exc:
            raise UserError(f"network interface {interface!r} (cluster.interface) has no IPv4 address on "
                            f"{socket.gethostname()}: {exc.strerror}") from None
    return socket.inet_ntoa(packed[20:24])


def reachable_address(host: str, interface: str | None = None) -> str:
    """The address of `host` that the other nodes reach it at. A name is resolved; where it resolves to loopback
    only (the host is this node, and Debian's /etc/hosts maps its own name to 127.0.1.1), the address of
    `interface` is used, else that of the default route; a name that does not resolve stays a name."""
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)]
    except OSError:
        return host
    reachable = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
    if reachable:
        return reachable[0]
    if interface:
        return interface_address(interface)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:  # a UDP connect sends nothing: it only picks the route and so the source address
            sock.connect(("192.0.2.1", 9))
            return sock.getsockname()[0]
        except OSError:  # no route out of this node: it can only be reaching itself
            return addresses[0]


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
        interface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0] or None
        addr = reachable_address(world.master_addr, interface) if world.source == "slurm" else world.master_addr
        if world.rank == 0:  # before joining: a rendezvous that hangs has said where it waits
            named = f" ({world.master_addr})" if addr != world.master_addr else ""
            print(f"rendezvous: {world.world_size} ranks ({world.source}) at {addr}{named} port {world.master_port}"
                  + (f" over {interface}" if interface else ""), flush=True)
        os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size), LOCAL_RANK=str(world.local_rank),
                          MASTER_ADDR=addr, MASTER_PORT=str(world.master_port))
        backend = "nccl" if device_type == "cuda" else "gloo"
        WATCHDOG.start(startup_timeout_s, step_timeout_s)
        timeout = max([PROCESS_GROUP_TIMEOUT_S] + [t + 60 for t in (startup_timeout_s, step_timeout_s) if t > 0])
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout),
                                device_id=device if device_type == "cuda" else None)
        if dist.get_world_size() != world.world_size:
            raise RuntimeError(f"rendezvous gave {dist.get_world_size()} ranks, expected {world.world_size}")
    return world, device


def _all_reduce(values: list[float], op_name: str, dtype) -> list:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    from nanochat.watchdog import WATCHDOG

    tensor = torch.tensor(values, dtype=dtype, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name))
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

    WATCHDOG.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


# Dense bf16 peak FLOP/s per GPU (no sparsity), for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
              "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device_name: str) -> float:
    """First match in table order (so "H100 PCIe" wins over "H100"); inf where unknown (MFU then reads 0 rather than a made-up number)."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device_name.lower():
            return flops
    return float("inf")
