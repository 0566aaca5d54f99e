"""Per-field validation rules of the config dataclasses, and the ConfigError they raise.

A rule says what is wrong with one field's value as a clause that names the fix ("must be an
integer >= 1", "is unknown; choose one of ..."), or returns None; ``check_fields`` puts the flag and
the value in front: ``--keep-checkpoints 0 must be an integer >= 1 (default: 2)``. Each config keeps
its table of rules next to its fields (``ghostsys.run.config.RULES``, ``ghostsys.check.checker.CHECK_RULES``).
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the flag and the fix."""


Rule = Callable[[Any], "str | None"]


def one_of(*options: Any) -> Rule:
    """The value is one of `options` (and of their type: True is not the stage 1)."""
    return lambda v: (None if v in options and type(v) in {type(o) for o in options}
                      else f"is unknown; choose one of {', '.join(map(str, options))}")


def integer(lo: int, hi: int | None = None, hi_text: str = "") -> Rule:
    """An int (not a bool) with lo <= value (<= hi)."""
    span = f">= {lo}" if hi is None else f"with {lo} <= value <= {hi_text or hi}"
    return lambda v: (None if isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi)
                      else f"must be an integer {span}")


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None) -> Rule:
    """A finite int or float inside the given bounds."""
    lo = f"> {gt}" if gt is not None else f">= {ge}" if ge is not None else ""
    hi = f"< {lt}" if lt is not None else f"<= {le:g}" if le is not None else ""
    span = f"in [{ge}, {lt})" if ge is not None and lt is not None else " and ".join(x for x in (lo, hi) if x)

    def rule(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))
        ok = ok and (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt) and (le is None or v <= le)
        return None if ok else f"must be a finite number {span}"
    return rule


def kind(t: type) -> Rule:
    """Any value of type `t` (a free-form string, a switch)."""
    return lambda v: None if isinstance(v, t) else f"must be a {t.__name__}"


def optional(rule: Rule) -> Rule:
    """None (not given), or a value that meets `rule`."""
    return lambda v: None if v is None else rule(v)


def blank_or(rule: Rule) -> Rule:
    """The empty string (the default applies), or a value that meets `rule`."""
    return lambda v: None if v == "" else rule(v)


def existing(what: str, is_dir: bool, fix: str) -> Rule:
    """A path to an existing folder (is_dir) or file."""
    return lambda v: (None if isinstance(v, str) and (Path(v).is_dir() if is_dir else Path(v).is_file())
                      else f"must be an existing {what}; {fix}")


def output_dir(v: Any) -> str | None:
    """A path where a results folder can be made: nothing on the way to it is a file."""
    if not isinstance(v, str):
        return "must be a path"
    for p in (Path(v), *Path(v).parents):
        if p.exists():
            return None if p.is_dir() else ("is a file" if p == Path(v) else f"lies under {p}, which is a file") + "; pass a folder path"
    return None


def device(v: Any) -> str | None:
    """auto, cpu, cuda or cuda:N."""
    ok = isinstance(v, str) and (v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None)
    return None if ok else "is unknown; choose auto, cpu or cuda (cuda:N for one GPU)"


def check_fields(cfg: Any, rules: dict[str, Rule]) -> None:
    """Raise ConfigError naming the flag and the fix for the first field of `cfg` that breaks its rule."""
    for f in fields(cfg):
        if f.name not in rules:
            raise TypeError(f"{type(cfg).__name__}.{f.name} has no validation rule: add one to its rule table")
        value = getattr(cfg, f.name)
        problem = rules[f.name](value)
        if problem:
            shown = repr(value) if isinstance(value, str) else value
            default = f" (default: {f.default})" if f.default not in ("", None) else ""
            raise ConfigError(f"--{f.name.replace('_', '-')} {shown} {problem}{default}")
