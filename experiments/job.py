"""The entry point every rank of a submitted job runs (pickled by submitit, so it must stay importable)."""

import sys

from nanochat import compile_cache
from nanochat.preemption import HANDLER, Interrupted, exit_code_after
from nanochat.scheduler import SlurmJob
from nanochat.world import discover_world, rendezvous_address


def run_in_job(overrides: list[str]) -> str:
    """Run the pipeline's stages on this allocation. Our signal handlers replace submitit's, whose USR2 handler
    would checkpoint on rank 0 only, from inside the handler. A stage stopped by a signal exits with the code
    that tells the batch step (slurm/after_srun.sh) whether to requeue (nanochat.preemption)."""
    from experiments.config import load_config
    from experiments.pipeline import run_pipeline
    from experiments.resume_guard import split_resume_flag

    HANDLER.install()
    try:
        rendezvous_address(discover_world())  # rank 0's first line says where the ranks meet
        compile_cache.seed()
        schema_overrides, resume_changed = split_resume_flag(overrides)
        run_pipeline(load_config(schema_overrides), overrides, resume_changed=resume_changed)
    except Interrupted as stop:  # saved, compile cache copied back, verdict left (nanochat.preemption.stop)
        print(stop, flush=True)
        sys.exit(stop.exit_code)
    except Exception as exc:  # the batch step requeues for a lost peer, never for an error of our own
        code = exit_code_after(exc)
        if code is None:
            raise
        sys.exit(code)
    compile_cache.publish(SlurmJob.from_env().procid or 0)  # every rank exits 0: srun waits for the copy
    return "done"
