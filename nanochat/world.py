"""Who this process is in its job: its rank, the number of ranks and where they meet, from torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, in a task that `srun` started (one per GPU), from Slurm's
(nanochat.scheduler.SlurmJob: the task's rank, the number of tasks, the rank on its node, the first host of the
node list). A batch or salloc shell is no rank of its allocation's world: there `nproc=N` starts N local ranks.

Torch-free, unlike nanochat.distributed which joins the process group: the launcher asks for the rank on the
login node too, where importing torch would cost seconds per submission.
"""

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from nanochat.common import UserError
from nanochat.scheduler import SlurmJob, first_host

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


_announced = False


def rendezvous_address(world: World) -> str:
    """Where the ranks meet, as this node reaches the first host (over GLOO_SOCKET_IFNAME, the profile's
    cluster.interface, when that is set). Rank 0 says so once per process: first in a Slurm job's ranks' output
    (experiments.job), and before joining: a rendezvous that hangs has said where it waits."""
    global _announced
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0] or None
    addr = reachable_address(world.master_addr, interface) if world.source == "slurm" else world.master_addr
    if world.rank == 0 and world.world_size > 1 and not _announced:
        named = f" ({world.master_addr})" if addr != world.master_addr else ""
        print(f"rendezvous: {world.world_size} ranks ({world.source}) at {addr}{named} port {world.master_port}"
              + (f" over {interface}" if interface else ""), flush=True)
        _announced = True
    return addr
