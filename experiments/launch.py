"""python -m experiments.launch [overrides]: run the pipeline (no arguments: the embedded default on this machine).

Exit codes: 0 done (or submitted, or stopped and requeued), 2 a user error (printed as one line), 75/76/77 stopped
after saving, for a time limit or preemption / a SIGTERM / no progress (nanochat.preemption: the batch step of a
Slurm job requeues on them; locally, run the same command again), 1 anything else.
With +cluster=NAME the pipeline is submitted to Slurm and the prompt comes back at once.
A sweep (+experiment=miniseries, +experiment=isoflop, or -m key=a,b ... over any keys) is many runs:
experiments/sweep/.
`+resume_changed=true` (not a config key) resumes a run folder whose saved config differs in result-changing keys.
Every key and its default: nanochat/config.py (the pipeline), experiments/cluster.py (+cluster), README.md.
"""

import importlib.util
import sys


# what every launch imports (looked up, not imported: --help stays torch-free)
DEPENDENCIES = ("hydra", "omegaconf", "submitit", "torch", "pyarrow", "xxhash")


def main(argv: list[str] | None = None) -> int:
    missing = next((name for name in DEPENDENCIES if importlib.util.find_spec(name) is None), None)
    if missing:  # a Python other than the venv's: the README's commands assume it is active
        print(f"error: {missing} is not installed for {sys.executable}: run `bash .ci/setup`, then "
              f"`source .venv/bin/activate` (or use .venv/bin/python)", file=sys.stderr)
        return 2
    return _launch(sys.argv[1:] if argv is None else argv)


def _launch(overrides: list[str]) -> int:
    from nanochat.common import UserError
    from nanochat.preemption import HANDLER, Interrupted, exit_code_after
    from nanochat.storage import OUT_OF_SPACE, storage_failure

    try:
        from experiments.launch_flags import handle, split_multirun

        multirun, overrides = split_multirun(overrides)
        code = handle(overrides, multirun)  # --help, --cfg job, --info, --shell-completion
        if code is not None:
            return code
        from experiments.config import load_config
        from experiments.pipeline import prepare_run, run_pipeline
        from experiments.preflight import check_this_machine
        from experiments.resume_guard import split_resume_flag
        from experiments.sweep.multirun import parse_multirun

        axes = None
        if multirun:  # the swept keys out, so that the rest composes the sweep's config
            overrides, axes = parse_multirun(overrides)
        schema_overrides, resume_changed = split_resume_flag(overrides)
        cfg = load_config(schema_overrides)
        if cfg.cluster is None:
            check_this_machine(cfg)
        if axes or cfg.sweep is not None or cfg.depths or cfg.flops_budgets:
            from experiments.sweep import launch_sweep

            launch_sweep(cfg, overrides, resume_changed, axes)
            return 0
        if cfg.cluster is not None:
            from experiments.slurm import submit

            submit(cfg, prepare_run(cfg, resume_changed, submitting=True), overrides)
            return 0
        HANDLER.install()
        # the full list goes on, flag included, so that local child ranks resume the same way
        run_pipeline(cfg, overrides, resume_changed=resume_changed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or quota anywhere (config.yaml, metrics, summaries): one line
        if exc.errno not in OUT_OF_SPACE:
            raise
        where = exc.filename or "."
        print(f"error: {storage_failure(exc, f'writing {where}', where)}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    except Exception as exc:  # a rank of an srun step (slurm/speedrun.slurm) whose peer is gone: requeue
        code = exit_code_after(exc)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
