"""Who this process is in its job: its rank, the number of ranks and where they meet, from torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, under `srun` with one task per GPU, from Slurm's
(nanochat.scheduler.SlurmJob: the task's rank, the number of tasks, the rank on its node, the first host of the
node list).

Torch-free, unlike nanochat.distributed which joins the process group: the launcher asks for the rank on the
login node too, where importing torch would cost seconds per submission.
"""

import os
from dataclasses import dataclass

from nanochat.scheduler import SlurmJob, first_host


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
    if (slurm.ntasks or 1) > 1 and slurm.procid is not None:
        # a port derived from the job id, so two jobs sharing a node do not collide
        port = int(env.get("MASTER_PORT", 20000 + int(slurm.job_id or 0) % 20000))
        addr = env.get("MASTER_ADDR") or first_host(slurm.nodelist or "127.0.0.1")
        return World(slurm.procid, slurm.localid or 0, slurm.ntasks, addr, port, "slurm", nodes=slurm.num_nodes or 1)
    return World(0, 0, 1, "127.0.0.1", 0, "single")
