"""Stop requests: a signal asks a run to checkpoint at the next step boundary and exit (DESIGN §8).

SLURM sends ``SIGUSR1`` some seconds before a job's time limit (``#SBATCH --signal=B:USR1@N``) or
when it is preempted; the batch script passes it on to every process of the run (``slurm/lib.sh``).
Each rank's handler only sets a flag. At every step boundary the loop all-reduces the flag
(:func:`ghostsys.run.dist.any_rank`), so the ranks stop at the SAME step even when the signal
reached only some of them, or reached them in different steps; they write one checkpoint there
and raise :class:`Preempted`, which the entry scripts turn into exit status :data:`EXIT_PREEMPTED`.
The same command, same ``--out``, resumes from that checkpoint to the same results.
"""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry". Launchers that
# start several processes (torchrun, accelerate launch) report any non-zero rank as their own 1.
EXIT_PREEMPTED = 75
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1,)


_STOPPED = re.compile(rb"stopped on [^\n]* at step \d+ with a checkpoint in ")


class Preempted(Exception):
    """The run stopped on request at a step boundary, after a checkpoint; the same command resumes."""

    def __init__(self, step: int, run_dir: Path, signame: str, is_main: bool = True) -> None:
        super().__init__(f"stopped on {signame} at step {step} with a checkpoint in {run_dir}/checkpoints; "
                         "the same command (same --out) resumes from there")
        self.step, self.run_dir, self.signame, self.is_main = step, run_dir, signame, is_main


def stopped_in(output: bytes) -> bool:
    """True when a run's output says it stopped on request (a launcher of several processes, e.g. torchrun,
    reports the ranks' exit status 75 as its own 1; the message rank 0 prints survives)."""
    return _STOPPED.search(output) is not None


class StopRequest:
    """A flag a signal handler sets; the loop reads it at step boundaries (handlers do nothing else)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object = None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived in this process."""
        return self.signum is not None

    @property
    def signame(self) -> str:
        """The signal's name (``SIGUSR1``), or ``a peer rank's request`` when only another rank got one."""
        return signal.Signals(self.signum).name if self.signum is not None else "a peer rank's request"


@contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Route `signals` to a StopRequest while the block runs; the previous handlers come back after.

    Python handles signals in the main thread only: called from another thread, nothing is
    installed and the request is never set (the run behaves as before).
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
