"""python -m experiments.status [RUN] [--all] [--watch] [--cluster PROFILE]: where runs stand.

RUN is a run folder or a run name under runs_root ($NANOCHAT_BASE_DIR/runs by default), or a sweep's folder: each
stage with its step, ETA and requeues, the whole pipeline's ETA, and the run's jobs. Without RUN (or with --all):
one line for every run and sweep under runs_root. --watch refreshes until the run is done or its jobs have ended.

Torch-free but for a stage in progress (its checkpoint's planned steps), so it answers at once on a login node."""

import argparse
import sys
import time
from pathlib import Path

from nanochat.common import UserError, run_cli
from nanochat.runs import Run, Sweep, find_run, resolve_runs_root
from nanochat.stage_table import STAGES

from experiments.run_status import finished, job_lines, job_states, pipeline_line, stage_line, summary_line

CLEAR = "\033[H\033[J"  # cursor home, clear the screen: --watch redraws in place on a terminal


def run_report(run: Run) -> tuple[list[str], bool]:
    """The lines of one run's status, and whether there is nothing left to watch (done, or its jobs ended)."""
    states = job_states([run])
    lines = [f"run {run.root}"] + [line for line in (stage_line(run, s) for s in STAGES) if line]
    return lines + [pipeline_line(run)] + job_lines(run, states), finished(run, states)


def all_runs_report(runs_root: Path) -> tuple[list[str], bool]:
    """One line per run under runs_root (a sweep: one line, its runs are listed by `status SWEEP`)."""
    folders = sorted(p.parent for p in runs_root.glob("*/config.yaml"))
    sweeps = sorted(p.parent for p in runs_root.glob("*/manifest.json"))
    if not folders and not sweeps:
        raise UserError(f"no runs under {runs_root}; give a run folder, --runs-root DIR or --cluster PROFILE")
    runs = [Run(f) for f in folders]
    states = job_states(runs)
    lines = [f"runs under {runs_root}"] + [f"  {summary_line(run, states)}" for run in runs]
    lines += [f"  {s.name:<28} sweep: python -m experiments.status {s}" for s in sweeps]
    return lines, all(finished(run, states) for run in runs)


def report(args) -> tuple[list[str], bool]:
    """What to print, and whether --watch can stop."""
    if args.run is None or args.all:
        return all_runs_report(resolve_runs_root(args.runs_root))
    run = find_run(args.run, args.runs_root)
    if not run.root.is_dir():
        raise UserError(f"no run folder {run.root}")
    if Sweep(run.root).is_sweep():  # a sweep folder: one line per run
        from experiments.sweep.status import print_status

        print_status(run.root)
        return [], sweep_done(run.root)
    return run_report(run)


def sweep_done(folder: Path) -> bool:
    from experiments.sweep.manifest import read_manifest
    from experiments.sweep.plan import is_done

    manifest = read_manifest(folder)
    return all(is_done(Sweep(folder).run(e["run_name"]), manifest["stages"]) for e in manifest["runs"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.status", description=__doc__.split("\n\n")[1])
    parser.add_argument("run", nargs="?", help="a run folder or name, or a sweep's folder (default: --all)")
    parser.add_argument("--all", action="store_true", help="one line for every run under runs_root")
    parser.add_argument("--runs-root", help="where the runs are (default: $NANOCHAT_BASE_DIR/runs, or the "
                        "--cluster profile's)")
    parser.add_argument("--watch", action="store_true", help="refresh until done (or the jobs have ended)")
    parser.add_argument("--every", type=float, default=30, help="seconds between refreshes with --watch")
    parser.add_argument("--cluster", metavar="PROFILE", help="use this cluster profile's runs_root (as +cluster=)")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.cluster and not args.runs_root:  # composed only when asked: hydra costs a login node a second
            from experiments.config import load_config, runs_root

            args.runs_root = str(runs_root(load_config([f"+cluster={args.cluster}"])))
        while True:
            if args.watch and sys.stdout.isatty():
                print(CLEAR, end="")
            lines, done = report(args)
            if lines:  # a sweep's status prints itself
                print("\n".join(lines), flush=True)
            if not args.watch or done:
                return
            time.sleep(args.every)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
