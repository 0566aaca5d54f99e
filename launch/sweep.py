#!/usr/bin/env python
"""Sweep tables (CSV, one row per run): write them, run their rows here, submit them to SLURM, collect results.

    python launch/sweep.py grid --gc 1,2,4,8,16 --gm 1,2,4,8,16 --seeds 0,1 -- --preset cifar100-wrn28-10
    python launch/sweep.py sequential --stage 1 --gm 2,4,8,16 --seeds 0,1 -- --dataset digits --model simplenet
    python launch/sweep.py sequential --stage 2 --stage1 sweeps/seqnorm_stage1.csv --gc 1,2,4 --seeds 0,1
    python launch/sweep.py run TABLE                  # every row here, one after another; a rerun resumes
    python launch/sweep.py run TABLE --row 3          # one row (what SLURM array task 3 runs)
    python launch/sweep.py submit TABLE --time 04:00:00 --throttle 8   # array job(s); prints the job id(s)
    python launch/sweep.py collect TABLE              # one table (CSV + printed); lists failed or missing rows

Everything after `--` is launch/run.py flags shared by every row of a new table (grid, sequential),
checked as launch/run.py would. A row's results go to <results>/<row_id>/ (default results:
runs/sweeps/<table name>/), whoever runs it. Parse -> library call (ghostsys.study.table_cli, job_cli).
"""

from __future__ import annotations

import argparse
import sys

from ghostsys.run.config import ConfigError
from ghostsys.study import job_cli, table_cli
from ghostsys.study.sweep import SweepError


def build_parser() -> argparse.ArgumentParser:
    """The parser: one subcommand per verb."""
    parser = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.set_defaults(run_flags=False)
    sub = parser.add_subparsers(dest="command", required=True)
    table_cli.add_all(sub)
    job_cli.add_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code (2 with one `error:` line for bad input, nothing written)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    head, run_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(head)
    try:
        if not args.run_flags:
            if run_argv:
                raise SweepError(f"`{args.command}` takes no run flags after --; they belong to grid and sequential")
            return args.func(args)
        args.func(args, run_argv)
    except (SweepError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
