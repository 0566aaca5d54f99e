#!/usr/bin/env python
"""Train one ghostsys run.

    accelerate launch launch/run.py --mode accumulate --nfp 8
    torchrun --nproc_per_node 2 launch/run.py --mode unsynced --nfp 2 --nprocs 2
    deepspeed --num_gpus 2 launch/run.py --engine deepspeed --mode unsynced --nprocs 2

Parse -> config -> ghostsys.run.train.train -> results in --out (default runs/<name>).
Bad input: one `error: ...` line naming the flag and the fix, exit 2, nothing written.
"""

import sys

from ghostsys.run.cli import build_parser, config_from_args, guarded
from ghostsys.run.train import train


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code."""
    parser = build_parser("launch/run.py", __doc__.split("\n\n")[0])
    return guarded(lambda: train(config_from_args(parser, argv)[0]))


if __name__ == "__main__":
    sys.exit(main())
