#!/usr/bin/env python
"""Check that every GhostNorm mechanism is the same experiment, against an independent reference.

    python launch/check.py                                   # n_g = 1: layer / accumulate factorizations
    torchrun --nproc_per_node 2 launch/check.py              # n_g = 2, Accelerate: unsynced, layer, syncbn
    deepspeed --num_gpus 2 launch/check.py --engine deepspeed

Prints a markdown report, writes check.jsonl/check.csv, exits non-zero if any comparison fails or
the negative control fails to differ.
"""

import sys

from ghostsys.check.checker import CheckConfig, check
from ghostsys.run.cli import build_parser, config_from_args, guarded


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code."""
    c, _ = config_from_args(build_parser("launch/check.py", __doc__, CheckConfig), argv, CheckConfig)
    code = 0

    def go() -> None:
        nonlocal code
        code = check(c)

    return guarded(go) or code


if __name__ == "__main__":
    sys.exit(main())
