"""launch/run.py with every step slowed by SLOW_STEP_S seconds, so a test can signal a run mid-way.

The sleep changes no number: a run of this script ends with the same results as launch/run.py.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ghostsys.run.train as train_mod  # noqa: E402
from ghostsys.run.cli import exit_process  # noqa: E402
from launch.run import main  # noqa: E402

SLOW_STEP_S = 1.0
_real_step = train_mod.train_step


def _slow_step(s, step, **kw):
    time.sleep(SLOW_STEP_S)
    return _real_step(s, step, **kw)


train_mod.train_step = _slow_step
exit_process(main)
