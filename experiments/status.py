"""python -m experiments.status RUN: where a run stands: each stage, its step and ETA, requeues, and its jobs.

RUN is a run folder or a run name under runs_root ($NANOCHAT_BASE_DIR/runs by default), or a sweep's folder."""

import sys

from nanochat.runs import Sweep, find_run
from nanochat.stage_table import STAGES

from experiments.run_status import job_lines, stage_line


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m experiments.status RUN_FOLDER_OR_NAME", file=sys.stderr)
        return 2
    run = find_run(args[0])
    if not run.root.is_dir():
        print(f"error: no run folder {run.root}", file=sys.stderr)
        return 2
    if Sweep(run.root).is_sweep():  # a sweep folder: one line per run
        from experiments.sweep.status import print_status

        return print_status(run.root)
    print(f"run {run.root}")
    for stage in STAGES:
        line = stage_line(run, stage)
        if line:
            print(line)
    for line in job_lines(run):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
