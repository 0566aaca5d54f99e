#!/usr/bin/env python
"""Check that every GhostNorm mechanism is the same experiment, against an independent reference.

    python launch/check.py                                   # n_g = 1: layer / accumulate factorizations
    python launch/check.py --dtype bf16-autocast             # training under --mixed-precision bf16
    torchrun --nproc_per_node 2 launch/check.py              # n_g = 2, Accelerate: unsynced, layer, syncbn
    deepspeed --num_gpus 2 launch/check.py --engine deepspeed

Prints a markdown report, writes check.jsonl/check.csv, exits non-zero if any comparison fails or
the negative control fails to differ. Bad input: one `error: ...` line naming the flag and the fix, exit 2.
"""

from ghostsys.check.checker import CheckConfig, check
from ghostsys.run.cli import build_parser, config_from_args, exit_process, guarded


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code (2 for bad input, 1 if a comparison fails)."""
    parser = build_parser("launch/check.py", __doc__, CheckConfig)
    return guarded(lambda: check(config_from_args(parser, argv, CheckConfig)[0]))


if __name__ == "__main__":
    exit_process(main)
