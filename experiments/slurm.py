"""Submitting the pipeline to Slurm with submitit; the login-node side.

A pipeline is at most two jobs. The tokenizer stages (tok_train, tok_eval) run first as one small CPU job, so
that they do not hold GPU nodes for the minutes they take; the training and evaluation stages run as one GPU job
(N nodes x one task per GPU) that starts once the first has succeeded (`--dependency=afterok`). One job for all
GPU stages, rather than one per stage, keeps the allocation (and its warm compile caches) across stage changes
and waits in the queue once. The submission returns at once; the jobs write their logs into <run>/slurm/.
"""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from nanochat import scheduler
from nanochat import compile_cache
from nanochat.common import UserError
from nanochat.preemption import SIGNAL_LEAD_ENV, VERDICT_DIR_ENV
from nanochat.runs import Run
from nanochat.stage_table import CPU_JOB_STAGES

from experiments.cluster import ClusterConfig

REPO = Path(__file__).resolve().parent.parent
# torchrun's variables in the submitting shell reach the job (sbatch exports the environment), where every task
# would take itself for that world's rank (nanochat.distributed reads them first): the job script unsets them
LEAKED_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# sbatch options the harness sets itself: logs, signals, requeue and dependencies rely on them
# set by the harness, or from a cluster field of their own (nodes, gpus_per_node, ...: the plan reads those)
HARNESS_OPTIONS = frozenset({"output", "error", "open-mode", "signal", "array", "dependency", "job-name", "requeue",
                             "no-requeue", "kill-on-invalid-dep", "wrap", "parsable", "nodes", "ntasks-per-node",
                             "gpus-per-node", "cpus-per-task", "time", "partition", "account", "qos"})
OPTION_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
CONTAINER_KINDS = ("pyxis", "apptainer")


def sbatch_options(options: dict, where: str) -> dict:
    """A profile's extra sbatch options ({exclusive: true, gres: "gpu:a100:4"}) as submitit's additional
    parameters: true is a bare flag, false and null are left out; one line for an entry sbatch could not take."""
    checked = {}
    for key, value in options.items():
        if not OPTION_NAME.fullmatch(str(key)):
            raise UserError(f"{where}: {key!r} is not an sbatch long option name (e.g. exclude, gres; no dashes "
                            f"before it)")
        name = str(key).replace("_", "-")
        if name in HARNESS_OPTIONS:
            raise UserError(f"{where}.{key}: the harness sets --{name} itself (from the profile's own fields, e.g. "
                            f"cluster.nodes, cluster.time_min)")
        if not (value is None or isinstance(value, (str, int, float)) and "\n" not in str(value)):
            raise UserError(f"{where}.{key}: {value!r} is not one sbatch value (a string, a number or true)")
        if value is not None and value is not False:
            checked[name] = value
    return checked


def shell_value(value: str) -> str:
    """`value` quoted for an export line of the job script: $VAR and ${VAR...} expand where the job runs (a
    profile's "$TMPDIR/cache", "/scratch/$USER"), spaces and quotes stay as they are, and neither backquotes nor
    $( ) run anything."""
    escaped = re.sub(r'([\\"`])', r"\\\1", value).replace("$(", "\\$(")
    return f'"{escaped}"'


def container_launch(cluster: ClusterConfig, mounts: list[str], *, gpu: bool) -> tuple[list[str], str | None]:
    """(srun arguments, the tasks' python command) that run the tasks in the profile's container, with `mounts`
    (paths the job must see at the same place) added to the profile's."""
    box = cluster.container
    if not box.kind and not box.image:
        return [], cluster.python
    if box.kind not in CONTAINER_KINDS:
        raise UserError(f"cluster.container.kind={box.kind!r}; valid: {', '.join(CONTAINER_KINDS)}")
    if not box.image:
        raise UserError(f"cluster.container.image is not set: name the {box.kind} image to run the tasks in")
    # srun's arguments reach the job script quoted, where no shell expands them: the profile's "$SCRATCH:/scratch"
    # and "$HOME/images/x.sif" are expanded here, as the login node sees them (as base_dir's mount is, in executor)
    image = os.path.expandvars(box.image)
    binds = ",".join(dict.fromkeys([*map(os.path.expandvars, box.mounts), *(f"{path}:{path}" for path in mounts)]))
    python = cluster.python or "python"
    if box.kind == "pyxis":
        return [f"--container-image={image}", f"--container-mounts={binds}"], python
    nv = ["--nv"] if gpu else []  # the GPU driver's libraries; a CPU node has none to bind
    return [], f"{shlex.join(['apptainer', 'exec', *nv, '--bind', binds, image])} {python}"


def executor(folder: Path, cluster: ClusterConfig, *, gpu: bool, env: dict[str, str], service=None):
    """A submitit executor for one of the two jobs; every rank gets `env` and the profile's setup lines.
    `service`: the submitit executor class of a job that serves rather than trains (the chat server), which
    writes no time-limit signal: it is never requeued and has none of the batch step's requeue hooks."""
    import submitit

    job = cluster.cpu_job
    cpus = cluster.cpus_per_task if gpu else job.cpus
    # the tasks read the repo, write in the folder above the logs (the run, sweep or chat folder) and read data
    # (base_dir's variables as the login node expands them: a mount is an srun argument, never expanded in the job)
    # and the shared compile cache (only the training job compiles: the tokenizer job and the chat server would
    # copy it for nothing)
    compiles = gpu and not service and bool(cluster.compile_cache)
    mounts = [str(REPO), str(folder.parent)] + [os.path.expandvars(path) for path in
                                                (env.get("NANOCHAT_BASE_DIR"), compiles and cluster.compile_cache)
                                                if path]
    container_srun, python = container_launch(cluster, mounts, gpu=gpu)
    # a dead node: Slurm ends the run (NODE_FAIL) and requeues the job itself. Not --no-kill: when the batch
    # step's node is the dead one, Slurm 22.05 shrinks the job to the survivors and keeps it RUNNING, with nothing
    # left to run, until its time limit (measured on the dev cluster)
    options = {"no_requeue" if service else "requeue": True,
               **(sbatch_options(cluster.sbatch, "cluster.sbatch") if gpu else
                  sbatch_options(job.sbatch, "cluster.cpu_job.sbatch"))}
    env = {"OMP_NUM_THREADS": str(cpus), **cluster.env, **env, **(compile_cache_env(cluster) if compiles else {})}
    # PYTHONPATH: the pickled entry point imports experiments; appended to what the setup lines' module loads set
    exports = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
               *(f"export {key}={shell_value(str(value))}" for key, value in env.items()),
               f"export {VERDICT_DIR_ENV}={shlex.quote(str(folder))}"]  # where ranks that leave abnormally say why
    # in the batch step (outside any container), before srun: how earlier runs of the job ended, failed nodes out
    before = f'eval "$(bash {shlex.quote(str(REPO / "slurm" / "before_srun.sh"))} {shlex.quote(str(folder))})"'
    # after srun: requeue when the ranks' exit code or verdicts ask
    after = f"bash {shlex.quote(str(REPO / 'slurm' / 'after_srun.sh'))} $? {shlex.quote(str(folder))}"
    # set +e: a profile's setup lines may `set -e`, which would end the script at a failed srun, before `after`
    setup = [f"unset {' '.join(LEAKED_RENDEZVOUS)}", *cluster.setup, *exports, "set +e",
             *([] if service else [before])]
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:  # submitit's own check is a RuntimeError traceback
        raise UserError(f"+cluster={cluster.name} submits to Slurm, but this machine has no {missing[0]}: submit from "
                        f"the cluster's login node, or leave out +cluster= to run here")
    # our own code requeues, not submitit
    ex = (service or submitit.SlurmExecutor)(folder=str(folder), max_num_timeout=0, python=python)
    ex.update_parameters(setup=setup, teardown=[] if service else [after], signal_delay_s=cluster.signal_lead_s,
                         cpus_per_task=cpus,
                         # srun's own --cpus-per-task: Slurm 22.05-23.02 give each task one CPU without it
                         srun_args=[*cluster.srun_args, *container_srun, f"--cpus-per-task={cpus}",
                                    "--kill-on-bad-exit=1"], additional_parameters=options)
    if gpu:
        ex.update_parameters(partition=cluster.partition, nodes=cluster.nodes, ntasks_per_node=cluster.ranks_per_node,
                             gpus_per_node=cluster.gpus_per_node or None, account=cluster.account, qos=cluster.qos,
                             constraint=cluster.constraint, mem=f"{cluster.mem_gb}GB" if cluster.mem_gb else None,
                             time=cluster.time_min)
    else:  # not the GPU job's constraint: a CPU partition may not know it
        ex.update_parameters(partition=job.partition or cluster.partition, nodes=1, ntasks_per_node=1,
                             account=job.account or cluster.account, qos=job.qos or cluster.qos,
                             mem=f"{job.mem_gb}GB" if job.mem_gb else None, time=job.time_min)
    return ex


def after_success(ex, job_id: str) -> None:
    """Start `ex`'s jobs once job `job_id` has succeeded; if it fails, Slurm cancels them rather than keeping them
    pending forever (DependencyNeverSatisfied)."""
    ex.update_parameters(dependency=f"afterok:{job_id}", additional_parameters={
        **ex.parameters["additional_parameters"], "kill-on-invalid-dep": "yes"})


def sbatch_refusal(exc: Exception) -> str:
    """Slurm's reason from submitit's error for a refused sbatch (its stderr), on one line."""
    lines = [line.strip().removeprefix("sbatch: error: ") for line in str(exc).strip().splitlines()]
    return "; ".join(line for line in lines if line) or "no reason given"


def compile_cache_env(cluster: ClusterConfig) -> dict[str, str]:
    """A working cache on each node's disk, seeded from and saved to the profile's shared one."""
    if not cluster.compile_cache:
        return {}
    work = "${TMPDIR:-/tmp}/nanochat-compile-${USER:-nanochat}"  # one path in every job (nanochat.compile_cache)
    return {compile_cache.SHARED_ENV: cluster.compile_cache, compile_cache.WORKDIR_ENV: work,
            "TORCHINDUCTOR_CACHE_DIR": f"{work}/inductor", "TRITON_CACHE_DIR": f"{work}/triton"}


def job_env(cfg) -> dict[str, str]:
    """Where the jobs find shared data, the network the ranks talk over, and the requeue cap that the batch step
    applies (slurm/after_srun.sh). Values may name shell variables that the job expands (shell_value)."""
    cluster = cfg.cluster
    env = {"NANOCHAT_MAX_REQUEUES": str(cfg.max_requeues), SIGNAL_LEAD_ENV: str(cluster.signal_lead_s)}
    if cluster.base_dir:  # always, once load_config resolved it (experiments.config.use_site_storage)
        env["NANOCHAT_BASE_DIR"] = cluster.base_dir
    if cluster.interface:  # nanochat.distributed also takes MASTER_ADDR from this interface where it must
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = cluster.interface
    return env


def submit(cfg, run: Run, overrides: list[str]) -> list[str]:
    """Submit what is left of the pipeline; print the contract's lines; return the job ids."""
    from submitit.core.utils import FailedJobError

    from experiments.job import run_in_job

    cluster = cfg.cluster
    if not cluster.partition:
        raise UserError(f"cluster profile {cluster.name!r} has no partition; set cluster.partition=NAME")
    todo = [s for s in cfg.stages if not run.is_done(s)]
    if not todo:
        print(f"Nothing to submit: every stage of {run.root} is done")
        return []
    folder = run.slurm_dir
    env = job_env(cfg)
    passthrough = [o for o in overrides if not o.startswith("stages=")]
    cpu_stages = [s for s in todo if s in CPU_JOB_STAGES]
    gpu_stages = [s for s in todo if s not in CPU_JOB_STAGES]
    # both executors first: a mistake in the profile is one line before anything is submitted
    cpu_ex = executor(folder, cluster, gpu=False, env=env) if cpu_stages else None
    gpu_ex = executor(folder, cluster, gpu=True, env=env) if gpu_stages else None
    jobs = []
    try:
        # submitit prints sbatch's stderr before it raises: the refusal's one line below says it instead
        with contextlib.redirect_stderr(io.StringIO()):
            if cpu_ex:
                cpu_ex.update_parameters(job_name=f"{run.root.name}-tok")
                jobs.append(("cpu", cpu_stages, cpu_ex.submit(run_in_job, passthrough + [_stages(cpu_stages)])))
            if gpu_ex:
                gpu_ex.update_parameters(job_name=run.root.name)
                if jobs:
                    after_success(gpu_ex, jobs[0][2].job_id)
                jobs.append(("gpu", gpu_stages, gpu_ex.submit(run_in_job, passthrough + [_stages(gpu_stages)])))
    except FailedJobError as exc:
        kind = "GPU" if jobs or not cpu_ex else "tokenizer"
        raise UserError(f"sbatch refused the {kind} job of run {run.root.name}: {sbatch_refusal(exc)}"
                        f"{_withdraw(run, jobs)}") from None
    record_jobs(run, jobs)
    main_kind, main_stages, main_job = jobs[-1]
    print(f"Submitted job {main_job.job_id}")
    for kind, stages, job in jobs:
        ranks = cluster.nodes * cluster.ranks_per_node if kind == "gpu" else 1
        after = f", after job {jobs[0][2].job_id}" if kind == "gpu" and len(jobs) == 2 else ""
        print(f"  job {job.job_id}: {', '.join(stages)} ({ranks} rank(s){after})")
        print(f"    log: {log_files(job.paths.stderr, job.paths.stdout)}")
    ids = " ".join(job.job_id for _, _, job in jobs)
    print(f"  follow: tail -f {main_job.paths.stdout} {main_job.paths.stderr}   |   "
          f"python -m experiments.status {run.root}")
    print(f"  cancel: scancel {ids}")
    return [job.job_id for _, _, job in jobs]


def log_files(stderr, stdout) -> str:
    """A job's log files as the `log:` lines name them: rank 0's .err first, where tracebacks and one-line errors
    go, then the .out beside it (progress)."""
    return f"{stderr} (errors), {Path(stdout).name} (output)"


def _withdraw(run: Run, jobs) -> str:
    """The tokenizer job already submitted when the GPU job was refused is cancelled: alone it would only hold
    the run's lease while it trains a tokenizer, and the same command after the fix submits both again. Where
    scancel fails it is recorded instead, so that status and the next submission see it."""
    if not jobs:
        return ""
    job = jobs[0][2]
    refused = scheduler.cancel(job.job_id)
    if refused is None:
        return f" (tokenizer job {job.job_id}, submitted before it, cancelled)"
    record_jobs(run, jobs)
    return f" (tokenizer job {job.job_id}, submitted before it, still queued: {refused}; scancel {job.job_id})"


def _stages(stages: list[str]) -> str:
    return f"stages=[{','.join(stages)}]"


def record_jobs(run: Run, jobs) -> None:
    """Append (kind, stages, submitit job) records to the run's jobs.jsonl (Run.jobs reads them back)."""
    run.slurm_dir.mkdir(parents=True, exist_ok=True)
    with open(run.jobs_path, "a") as f:
        for kind, stages, job in jobs:
            f.write(json.dumps({"job_id": job.job_id, "kind": kind, "stages": stages, "submitted": time.time(),
                                "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                                "argv": sys.argv[1:]}) + "\n")
