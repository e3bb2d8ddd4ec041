"""A rank that stops making progress exits, instead of holding the allocation until the job's time limit.

A dead node, a frozen or OOM-killed peer, a hung collective: the surviving ranks block inside a collective (a
gloo or NCCL timeout would end them only after the process group's timeout, the same for start-up and steady
state). Progress is "a collective completed" (every step and every evaluation batch agrees on a stop flag) or
"an optimizer step completed". Until the first optimizer step the start-up timeout applies (rendezvous, a cold
filesystem, compiling), afterwards the step timeout, except while this rank writes its checkpoint files (a slow
shared filesystem: the start-up timeout again; waiting for the peers' writes is the step timeout, since a peer
frozen in its write looks the same from here). On expiry the rank prints one line and exits with
EXIT_HUNG; srun's --kill-on-bad-exit takes the other ranks down, and the batch step requeues the job, excluding
the nodes Slurm sees as dead (slurm/after_srun.sh). Work lost is bounded by `save_every_minutes`.
"""

import os
import sys
import threading
import time

from nanochat.preemption import EXIT_HUNG, leave_verdict


class Watchdog:
    def __init__(self):
        self._deadline = None  # time.monotonic() past which this rank is hung; None: not watching
        self._timeouts = (0.0, 0.0)  # (start-up, step) seconds; 0 = no limit
        self._steady = False
        self._phase, self._limit = "start-up timeout", 0.0  # what the current deadline waits for, and its length
        self._thread = None

    def start(self, startup_s: float, step_s: float) -> None:
        """Watch from now on (a stage joined its process group): the start-up timeout applies first."""
        self._timeouts, self._steady = (startup_s, step_s), False
        self.beat()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="nanochat-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._timeouts, self._deadline = (0.0, 0.0), None  # a beat after this watches nothing

    def beat(self, step_done: bool = False, slow: str = "") -> None:
        """This rank made progress; `step_done`: an optimizer step, after which the step timeout applies. `slow`
        names what comes next when it may take as long as a start-up (writing a checkpoint to a slow shared
        filesystem): the start-up timeout applies until the next beat."""
        self._steady = self._steady or step_done
        self._phase = f"{slow}, start-up timeout" if slow else "step timeout" if self._steady else "start-up timeout"
        self._limit = self._timeouts[1] if self._steady and not slow else self._timeouts[0]
        self._deadline = time.monotonic() + self._limit if self._limit > 0 else None

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                line = (f"rank {os.environ.get('RANK', '0')}: no progress for {self._limit:.0f} s ({self._phase}): a "
                        f"peer rank or its node is gone; exiting with code {EXIT_HUNG} so that the job is requeued")
                print(line, file=sys.stderr, flush=True)
                leave_verdict("hung", line)
                os._exit(EXIT_HUNG)


WATCHDOG = Watchdog()  # started by nanochat.distributed.init_distributed for a world of more than one rank
