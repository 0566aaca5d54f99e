"""The ``run`` wing: the one training program (imports ``ghostsys.nn`` only).

``config`` (the frozen, validated RunConfig; ``rules``: its per-field rules) and ``cli`` (flags generated
from it), ``prepare`` (the checks, data and model opened before a run writes anything), ``dist`` (process
groups: the only reader of launcher env vars), ``engines`` (Accelerate / DeepSpeed adapters),
``modes`` (layer / accumulate / unsynced / syncbn), ``data`` and ``datasets`` (the mode-independent
batch order, local readers), ``train`` (the one loop, instrumented from above through callbacks),
``checkpoint``, ``schedules`` and ``rundir`` (run directories). Submodules are imported on use, so
that ``from ghostsys.run import dist`` stays cheap in worker processes.
"""

from ghostsys.run.config import ConfigError, RunConfig

__all__ = ["ConfigError", "RunConfig"]
