"""Cluster profiles (experiments/conf/cluster/*.yaml, or a site's own under ~/.config/nanochat/cluster/): what a
Slurm submission needs to know about a site. `+cluster=NAME` selects one; every field can be overridden
(`cluster.nodes=4`)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CpuJob:
    """The small job that trains and evaluates the tokenizer first, so that it does not hold GPU nodes."""
    partition: Optional[str] = None  # default: the GPU partition
    cpus: int = 16
    mem_gb: int = 64
    time_min: int = 60


@dataclass
class SweepResources:
    """What the runs of a sweep up to `max_depth` (and above the previous entry's) ask for: one job array each.
    None keeps the cluster profile's value (device_batch_size: the config's; lower it where a depth needs the
    memory, which changes no result)."""
    max_depth: int
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    time_min: Optional[int] = None  # a run that hits it saves and requeues itself, so this bounds a wait, not a run
    device_batch_size: Optional[int] = None


@dataclass
class ClusterConfig:
    name: str = "custom"
    partition: str = ""
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0  # ranks per node; 0 = one per GPU
    cpus_per_task: int = 8
    mem_gb: int = 0  # per node; 0 = Slurm's default
    time_min: int = 24 * 60
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # USR2 this long before the time limit: time to save one checkpoint (slurm/speedrun.slurm's --signal says
    # the same; a test keeps them equal)
    signal_lead_s: int = 180
    setup: list[str] = field(default_factory=list)  # shell lines before the job starts (module load, venv, ...)
    env: dict[str, str] = field(default_factory=dict)  # NCCL settings and the like
    srun_args: list[str] = field(default_factory=list)  # container hooks, e.g. ["--container-image=..."] (pyxis)
    python: Optional[str] = None  # the command that runs the tasks' Python (a container's); default: this one
    base_dir: Optional[str] = None  # NANOCHAT_BASE_DIR on shared storage (data, eval bundle)
    runs_root: Optional[str] = None  # run folders on shared scratch
    compile_cache: Optional[str] = None  # triton/inductor caches on shared storage: a requeue does not recompile
    cpu_job: CpuJob = field(default_factory=CpuJob)
    # The chat job's `ssh -L` line (experiments/chat.py): the login node as your laptop names it (default: the
    # name the submitting machine gives itself, often internal), and a bastion in front of it (`ssh -J`)
    login_host: Optional[str] = None
    jump_host: Optional[str] = None

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)
