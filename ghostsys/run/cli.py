"""Command-line flags generated from RunConfig: one flag per field, its docstring as help."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, NoReturn, Sequence

from ghostsys.run.config import ConfigError, RunConfig, field_docs

# Filled in from the launcher, never typed by the user.
_NOT_FLAGS = ("world_size",)


class _Parser(argparse.ArgumentParser):
    """argparse, except that a malformed command line is one ConfigError naming the argument, not a usage block."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing usage and exiting: guarded() turns it into one `error:` line, exit 2."""
        raise ConfigError(f"{message}; see {self.prog} --help")


def build_parser(prog: str, description: str, cls: type = RunConfig) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per field of a config dataclass (defaults from the dataclass)."""
    parser = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    """Run fn; turn the errors a user can fix into one `error:` line on stderr (rank 0 only) and an exit code.

    ConfigError (bad input, argparse's refusals included) exits 2; TrainingError (e.g. a NaN loss) 1;
    an int that fn returns is the exit code, anything else 0. Other exceptions are bugs: they propagate.
    A requested stop (SIGUSR1, see ghostsys.run.preempt) exits with EXIT_PREEMPTED (75) after its checkpoint.
    """
    from ghostsys.run.preempt import EXIT_PREEMPTED, Preempted
    from ghostsys.run.train import TrainingError

    try:
        result = fn()
    except Preempted as stopped:  # not an error: a requested stop that the same command resumes
        if stopped.is_main:
            print(f"stopped: {stopped}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except ConfigError as err:
        _say(err)
        return 2
    except TrainingError as err:
        _say(err)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def exit_process(main: Callable[[], int | str | None]) -> NoReturn:
    """``sys.exit(main())`` for an entry script, except that a process that was in a process group skips
    interpreter finalization, where gloo's worker threads can abort a finished run (ghostsys.run.dist.exit_if_joined).
    """
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
    except BaseException as err:  # a bug: its traceback as Python prints it, then the same exit
        if not _joined():
            raise
        sys.excepthook(type(err), err, err.__traceback__)
        code = 130 if isinstance(err, KeyboardInterrupt) else 1
    if _joined():
        from ghostsys.run import dist

        dist.exit_if_joined(code)
    sys.exit(code)


def _joined() -> bool:
    # Only a process that imported ghostsys.run.dist (and so torch) can have joined a group through it;
    # checking sys.modules keeps flag-only entry points (sweep rows, the profile driver) free of torch.
    dist = sys.modules.get("ghostsys.run.dist")
    return dist is not None and dist.joined()


def _say(err: Exception) -> None:
    # Every rank meets the same error (see train.agreed); one line from rank 0 is the whole message.
    from ghostsys.run import dist  # imported here: parsing and checking flags never needs torch (sweep rows)

    if dist.launched_rank() == 0:
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
