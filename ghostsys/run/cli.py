"""Command-line flags generated from RunConfig: one flag per field, its docstring as help."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Sequence

from ghostsys.run.config import RunConfig, field_docs

# Filled in from the launcher, never typed by the user.
_NOT_FLAGS = ("world_size",)


def build_parser(prog: str, description: str, cls: type = RunConfig) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per field of a config dataclass (defaults from the dataclass)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(cls)
    # The `deepspeed` launcher appends --local_rank=N; ghostsys.run.dist reads LOCAL_RANK from the env instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        if f.name in _NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        help_ = docs.get(f.name, "")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f"{help_} (default: {f.default})")
        elif kind.startswith("int"):
            parser.add_argument(flag, type=int, default=f.default, help=f"{help_} (default: {f.default})")
        elif kind.startswith("float"):
            parser.add_argument(flag, type=float, default=f.default, help=f"{help_} (default: {f.default})")
        else:
            parser.add_argument(flag, type=str, default=f.default, help=f"{help_} (default: {f.default})")
    return parser


def config_from_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                     cls: type = RunConfig) -> tuple[Any, argparse.Namespace]:
    """Parse argv into a config dataclass (not yet validated: the world size comes from the launcher)."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in vars(args).items() if k in names})
    return cfg, args


def guarded(fn: Callable[[], object]) -> int:
    """Run fn; turn the errors a user can fix into one clear line on stderr and a non-zero exit code.

    A requested stop (SIGUSR1, see ghostsys.run.preempt) exits with EXIT_PREEMPTED (75) after its checkpoint.
    """
    from ghostsys.run.config import ConfigError
    from ghostsys.run.preempt import EXIT_PREEMPTED, Preempted
    from ghostsys.run.train import TrainingError

    try:
        fn()
    except Preempted as stopped:  # not an error: a requested stop that the same command resumes
        if stopped.is_main:
            print(f"stopped: {stopped}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except (TrainingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0
