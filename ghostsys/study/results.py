"""Results loading: any set of run directories (training, check, profile) as one pandas DataFrame."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ghostsys.run.rundir import RUN_FILES, read_jsonl

if TYPE_CHECKING:  # pandas is imported only by the loaders, not by training processes
    import pandas as pd


def _is_run(d: Path) -> bool:
    return any((d / f).exists() for f in RUN_FILES)


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run directories named by `paths`: run dirs, parents holding them (searched recursively), globs."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, None] = {}
    for p in paths:
        s = os.fspath(p)
        matches = sorted(glob.glob(s, recursive=True)) if glob.has_magic(s) else [s]
        for m in map(Path, matches):
            if not m.is_dir():
                continue
            if _is_run(m):
                found[m] = None
            else:
                for f in sorted(m.rglob("*")):
                    if f.name in RUN_FILES and "checkpoints" not in f.relative_to(m).parts:
                        found[f.parent] = None
    return list(found)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def _settings(d: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Add config.json fields (cfg.* on a clash) and env.json fields (env.*: machine, versions) to row."""
    for k, v in _flatten(_read_json(d / "config.json")).items():
        row[f"cfg.{k}" if k in row else k] = v
    for k, v in _flatten(_read_json(d / "env.json"), "env.").items():
        row.setdefault(k, v)
    return row


def load(paths: str | Path | Iterable[str | Path]) -> "pd.DataFrame":
    """One DataFrame row per run (training, check or profile): run_dir, status, summary.json fields,
    config.json fields (cfg.* on a clash), env.json fields as env.* (machine, versions)."""
    import pandas as pd

    rows = []
    for d in find_runs(paths):
        summary = _flatten(_read_json(d / "summary.json"))
        row: dict[str, Any] = {"run_dir": str(d), "status": "incomplete" if not summary else "complete"}
        row |= summary  # a summary's own status (e.g. "failed") wins over the default
        rows.append(_settings(d, row))
    return pd.DataFrame(rows)


def load_ranks(paths: str | Path | Iterable[str | Path]) -> "pd.DataFrame":
    """One DataFrame row per (profiled run, rank): profile_ranks.jsonl lines with their run's settings."""
    import pandas as pd

    rows = [_settings(d, {"run_dir": str(d), **_flatten(r)})
            for d in find_runs(paths) for r in read_jsonl(d / "profile_ranks.jsonl")]
    return pd.DataFrame(rows)


def load_metrics(paths: str | Path | Iterable[str | Path]) -> "pd.DataFrame":
    """One DataFrame row per metrics line of every run, with its run_dir."""
    import pandas as pd

    rows = [{"run_dir": str(d), **_flatten(r)} for d in find_runs(paths) for r in read_jsonl(d / "metrics.jsonl")]
    return pd.DataFrame(rows)
