"""Run the pipeline's stages in order in one run folder, skipping those already done.

With nproc=N (an 8-GPU workstation, or an salloc shell) each distributed stage runs as N local processes that
rendezvous like torchrun's; the others run in this process. Inside a multi-rank job (srun), a single-process
stage (tokenizer training) runs on rank 0 while the other ranks wait for its summary.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

from nanochat import lease
from nanochat.common import UserError, atomic_write_text, print0
from nanochat.config import Config
from nanochat.world import discover_world
from nanochat.runs import Run
from nanochat.report import write_report
from nanochat.stage_table import TABLE

from tasks.mixtures import stage_tasks

from experiments.config import runs_root, to_yaml
from experiments.preflight import check_inputs
from experiments.resume_guard import check_resume


def run_folder(cfg: Config) -> Run:
    return Run(runs_root(cfg) / (cfg.run_name or f"{cfg.experiment_name}-d{cfg.depth}"))


def check_run(cfg: Config, resume_changed: bool = False) -> tuple[Run, str]:
    """The run folder and the config.yaml to write there, after checking the command against its saved config
    (every rank checks); nothing is written yet."""
    if cfg.cluster is not None and cfg.cluster.runs_root and not cfg.runs_root:
        cfg.runs_root = cfg.cluster.runs_root  # config.yaml records the folder the profile chose
    run = run_folder(cfg)
    new_yaml = to_yaml(cfg)
    warning = check_resume(run.config_path, run.root.name, new_yaml, resume_changed)
    if warning:
        print0(warning, file=sys.stderr)
    # on the login node at submission, and before hours of pretraining rather than after
    for note in check_inputs(cfg, run, [s for s in cfg.stages if not run.is_done(s)]):
        print0(note, file=sys.stderr)
    return run, new_yaml


def write_config(run: Run, new_yaml: str) -> None:
    if discover_world().rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config_path, new_yaml)


def prepare_run(cfg: Config, resume_changed: bool = False, submitting: bool = False) -> Run:
    """The run folder, checked and its config.yaml written (rank 0). `submitting`: first refuse a run that a live
    process or a queued job writes in (nanochat.lease.check_free), before writing anything."""
    run, new_yaml = check_run(cfg, resume_changed)
    if submitting:
        lease.check_free(run)
    write_config(run, new_yaml)
    return run


@contextmanager
def holding_lease(run: Run):
    """Rank 0 holds the run's lease for the pipeline; the other ranks, and local ranks whose launcher holds it,
    trust it. While it is held, its token is in this process's environment, for the local ranks it spawns."""
    if discover_world().rank != 0 or lease.trusted_from_parent(run.lease_path):
        yield
        return
    before = os.environ.get(lease.TOKEN_ENV)
    with lease.Lease(run.lease_path, run.root.name) as held:
        os.environ[lease.TOKEN_ENV] = held.token
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(lease.TOKEN_ENV, None)
            else:
                os.environ[lease.TOKEN_ENV] = before


def run_pipeline(cfg: Config, overrides: list[str], resume_changed: bool = False) -> Run:
    """`overrides` are forwarded as-is to local child processes (keep +resume_changed=true in them, if given).
    Rank 0 holds the run's lease (nanochat.lease) from before config.yaml is written until the end, whatever the
    end: a second launch on the same run refuses in one line."""
    run, new_yaml = check_run(cfg, resume_changed)
    world = discover_world()
    with holding_lease(run):
        write_config(run, new_yaml)
        print0(f"run folder: {run.root}")
        for spec in (s for s in TABLE if s.name in cfg.stages):
            stage = spec.name
            if run.is_done(stage):
                print0(f"[{stage}] done already (summary.json present), skipped")
            elif spec.all_ranks and cfg.nproc > 1 and world.world_size == 1:
                print0(f"[{stage}] starting on {cfg.nproc} local processes")
                spawn_local(cfg.nproc, overrides + [f"stages=[{stage}]"])
            elif not spec.all_ranks and world.rank != 0:
                while not run.is_done(stage):  # rank 0 runs it; if rank 0 dies, srun --kill-on-bad-exit ends us too
                    time.sleep(1)
            else:
                print0(f"[{stage}] starting")
                run.stage_dir(stage).mkdir(parents=True, exist_ok=True)
                summary = spec.load()(cfg, run, stage_tasks(cfg, stage))
                if world.rank == 0:
                    run.write_summary(stage, summary)
        if world.rank == 0:
            print0(f"report: {write_report(run, gpu_hour_price=cfg.gpu_hour_price)}")
    return run


def spawn_local(nproc: int, overrides: list[str]) -> None:
    """Start `nproc` copies of the launcher as ranks of one world on this machine; if one fails, stop the rest.
    They inherit the lease holder's token (holding_lease), so they trust this process's lease, not refuse it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "experiments.launch", *overrides], env=env))

    def forward(signum, frame):  # like srun, unlike torchrun: every rank hears USR2/TERM and stops at a boundary
        for proc in procs:
            proc.send_signal(signum)

    for signum in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(signum, forward)
    failed = None
    while procs and failed is None:
        if lease.lost():  # another writer took the run over: the ranks must not save again
            for proc in procs:
                proc.kill()
            raise UserError(f"stopped the {nproc} local ranks without saving: another process took over run "
                            f"{lease.lost()}'s lease (see its lease.json)")
        for proc in list(procs):
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            procs.remove(proc)
            if code != 0:
                failed = code
    for proc in procs:  # like srun --kill-on-bad-exit: the others wait in a collective for the one that failed
        proc.kill()
        proc.wait()
    if failed is not None:
        raise SystemExit(failed)
