"""Cluster profiles (experiments/conf/cluster/*.yaml, or a site's own under ~/.config/nanochat/cluster/): what a
Slurm submission needs to know about a site. `+cluster=NAME` selects one; every field can be overridden
(`cluster.nodes=4`).

Values that become job environment (`env`, `base_dir`, `compile_cache`) may use shell variables ("$TMPDIR/cache",
"/scratch/$USER"): the job expands them where it runs. `runs_root` is expanded where it is read (the login node
and the job alike), and the container's `image` and `mounts` on the login node at submission (srun's arguments
are not expanded in the job), so these should name shared storage by variables both see, such as $USER.
"""

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class CpuJob:
    """The small job that trains and evaluates the tokenizer first, so that it does not hold GPU nodes. Many sites
    refuse a CPU-only job on a GPU partition: give it a CPU partition, and the account and QoS that go with it."""
    partition: Optional[str] = None  # default: the GPU partition
    account: Optional[str] = None  # default: the profile's account
    qos: Optional[str] = None  # default: the profile's QoS
    cpus: int = 16
    mem_gb: int = 64
    time_min: int = 60
    sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch options for this job, as ClusterConfig.sbatch


@dataclass
class Container:
    """Where the tasks run in a container. `pyxis`: srun starts them in `image` (--container-image), with the
    `mounts` ("src:dst" or "path") plus the repo, the job's run folder and base_dir mounted at the same paths.
    `apptainer`: each task runs `apptainer exec [--nv] --bind MOUNTS IMAGE python`. Either way `cluster.python`
    is then the interpreter inside the image (default `python`). The batch step runs outside the container."""
    kind: str = ""  # pyxis | apptainer; empty: no container
    image: str = ""  # pyxis: a registry image or a .sqsh file; apptainer: a .sif file
    mounts: list[str] = field(default_factory=list)


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
    cpus_per_task: int = 8  # also given to srun (Slurm 22.05-23.02 give each task one CPU otherwise) and, unless
    #                         env sets it, as OMP_NUM_THREADS
    mem_gb: int = 0  # per node; 0 = Slurm's default
    time_min: int = 24 * 60
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # any other sbatch long option the site needs, for the GPU job: {reservation: R, exclusive: true, mem: 0,
    # exclude: "n[1-2]", gres: "gpu:a100:4"}; true = a flag without a value, false or null = left out
    sbatch: dict[str, Any] = field(default_factory=dict)
    # USR2 this long before the time limit: time to save one checkpoint (slurm/speedrun.slurm's --signal says
    # the same; a test keeps them equal)
    signal_lead_s: int = 180
    setup: list[str] = field(default_factory=list)  # shell lines before the job starts (module load, venv, ...)
    env: dict[str, str] = field(default_factory=dict)  # NCCL settings and the like
    interface: Optional[str] = None  # the one network interface ranks talk over (NCCL/GLOO_SOCKET_IFNAME), e.g. ib0
    srun_args: list[str] = field(default_factory=list)  # more srun arguments
    container: Container = field(default_factory=Container)  # pyxis or Apptainer (see Container)
    python: Optional[str] = None  # the command that runs the tasks' Python; default: this one, or the container's
    base_dir: Optional[str] = None  # NANOCHAT_BASE_DIR on shared storage (data, eval bundle)
    runs_root: Optional[str] = None  # run folders on shared scratch
    # triton/inductor caches on shared storage: seeds each node's working cache, and rank 0 saves into it at the
    # end of a job or before a requeue, so a requeue does not recompile (nanochat.compile_cache)
    compile_cache: Optional[str] = None
    cpu_job: CpuJob = field(default_factory=CpuJob)
    # The chat job's `ssh -L` line (experiments/chat.py): the login node as your laptop names it (default: the
    # name the submitting machine gives itself, often internal), and a bastion in front of it (`ssh -J`)
    login_host: Optional[str] = None
    jump_host: Optional[str] = None

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)
