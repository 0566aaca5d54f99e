"""launch/run.py, except that rank 1 is SIGKILLed at step 3: a dead-rank drill for the tests."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ghostsys.run.train as train_mod  # noqa: E402
from ghostsys.run.cli import exit_process  # noqa: E402
from launch.run import main  # noqa: E402

_real_step = train_mod.train_step


def _dying_step(s, step, **kw):
    if s.info.rank == 1 and step == 3:
        print("die_at_step: rank 1 is killing itself", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_step(s, step, **kw)


train_mod.train_step = _dying_step
exit_process(main)
