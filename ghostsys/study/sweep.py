"""Sweep tables: one CSV row per run (flags + seed + a stable row id), and the command that runs a row.

A table is what ``launch/sweep.py`` writes (SeqNorm grid, sequential strategy, mode x device-count
profiles) or what a user writes by hand; it runs locally row by row or as a SLURM array job, task
``i`` running row ``i`` (DESIGN §8). Columns:

- ``row_id``: stable and unique in the table, safe as a directory name; a row's results go to
  ``<results>/<row_id>/`` whatever job runs it, so reruns and requeues never collide;
- ``launcher``: ``python``, ``torchrun``, ``accelerate`` or ``deepspeed``; ``nprocs``: processes it starts;
- ``script``: the entry script (default ``launch/run.py``), relative to the repository root (where
  ``launch/`` lives) or absolute, so a row runs the same from any working directory;
- every other column is a flag of that script, named as its config field (``mode``, ``nfp``, ``seed``,
  ...). An empty cell means the flag is not given; booleans are ``true``/``false``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from ghostsys.run.launchers import LAUNCHERS
from ghostsys.run.launchers import launcher_command as _launcher_command

META = ("row_id", "launcher", "nprocs", "script")
DEFAULT_SCRIPT = "launch/run.py"
# The checkout ghostsys runs from (an editable install): relative `script` cells are read from here.
REPO_ROOT = Path(__file__).resolve().parents[2]
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SweepError(ValueError):
    """A sweep table that cannot run; the message names the row and the fix."""


def row_id(flags: Mapping[str, Any], prefix: str = "", *, launcher: str = "python", nprocs: int = 1,
           script: str = DEFAULT_SCRIPT) -> str:
    """A readable, stable id: `prefix` plus 8 hex digits of a hash of everything the row runs."""
    what = {"flags": {k: _cell(v) for k, v in flags.items() if _cell(v) != ""}, "launcher": launcher,
            "nprocs": int(nprocs), "script": script}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix).strip("_.-")
    return f"{prefix}-{digest}" if prefix else digest


def make_row(flags: Mapping[str, Any], *, name: str = "", launcher: str = "python", nprocs: int = 1,
             script: str = DEFAULT_SCRIPT) -> dict[str, Any]:
    """One table row: the meta columns plus the flags, with an id derived from all of them."""
    if launcher not in LAUNCHERS:
        raise SweepError(f"launcher {launcher!r} is unknown; choose one of {', '.join(LAUNCHERS)}")
    clash = sorted(set(flags) & set(META))
    if clash:
        raise SweepError(f"flag column(s) {clash} clash with the table's own columns {META}")
    rid = row_id(flags, name, launcher=launcher, nprocs=nprocs, script=script)
    return {"row_id": rid, "launcher": launcher, "nprocs": int(nprocs), "script": script, **dict(flags)}


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def write_table(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as CSV (meta columns first, then every flag column in first-seen order); atomic."""
    rows = [dict(r) for r in rows]
    _validate(rows, str(path))
    flag_cols: dict[str, None] = {}
    for r in rows:
        flag_cols.update({k: None for k in r if k not in META})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*META, *flag_cols])
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in (*META, *flag_cols)})
    os.replace(tmp, path)
    return path


def read_table(path: str | Path) -> list[dict[str, str]]:
    """The rows of a sweep table as dicts of strings (empty cells dropped); SweepError if malformed."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep table {path} does not exist; write one with `launch/sweep.py grid|sequential|profile`")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in META if c not in (reader.fieldnames or [])]
        if missing:
            raise SweepError(f"{path}: missing column(s) {', '.join(missing)}; a sweep table needs {', '.join(META)}")
        rows = [{k: v.strip() for k, v in r.items() if k is not None and v is not None and v.strip() != ""}
                for r in reader]
    _validate(rows, str(path))
    return rows


def _validate(rows: list[dict[str, Any]], where: str) -> None:
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        rid = _cell(r.get("row_id"))
        if not _SAFE_ID.match(rid):
            raise SweepError(f"{where}: row {i} has row_id {rid!r}; use letters, digits, '.', '_' and '-' only")
        if rid in seen:
            raise SweepError(f"{where}: rows {seen[rid]} and {i} share row_id {rid!r}; row ids must be unique")
        seen[rid] = i
        if _cell(r.get("launcher")) not in LAUNCHERS:
            raise SweepError(f"{where}: row {i} ({rid}) has launcher {r.get('launcher')!r}; choose one of "
                             f"{', '.join(LAUNCHERS)}")
        n = _cell(r.get("nprocs"))
        if not n.isdigit() or int(n) < 1:
            raise SweepError(f"{where}: row {i} ({rid}) has nprocs {n!r}; use a positive integer")
        if _cell(r.get("launcher")) == "python" and int(n) != 1:
            raise SweepError(f"{where}: row {i} ({rid}) runs {n} processes with launcher python; use torchrun, "
                             "accelerate or deepspeed for more than one")


def script_path(row: Mapping[str, Any]) -> Path:
    """The row's entry script as an absolute path: relative cells are relative to the repository root."""
    script = Path(_cell(row.get("script")) or DEFAULT_SCRIPT)
    return script if script.is_absolute() else REPO_ROOT / script


def check_rows(rows: list[dict[str, Any]], where: str) -> None:
    """Refuse, before anything runs, a row whose script is missing or whose flags launch/run.py would refuse.

    Rows of launch/run.py are parsed with its own parser and validated as a RunConfig at the row's
    process count, so a typo fails here, not hours later on a cluster node. Other scripts' flags are
    theirs to check.
    """
    from ghostsys.run import presets
    from ghostsys.run.cli import build_parser, config_from_args
    from ghostsys.run.config import ConfigError

    for i, row in enumerate(rows):
        rid, script = row["row_id"], script_path(row)
        if not script.is_file():
            raise SweepError(f"{where}: row {i} ({rid}) runs {script}, which does not exist; give the script "
                             f"relative to the repository root {REPO_ROOT} or as an absolute path")
        if script != REPO_ROOT / DEFAULT_SCRIPT:
            continue
        parser = build_parser(DEFAULT_SCRIPT, "")

        def refuse(message: str, i: int = i, rid: str = rid) -> None:
            raise SweepError(f"{where}: row {i} ({rid}): {message}; fix that column")

        parser.error = refuse  # argparse would print usage and exit; name the row instead
        argv = row_argv(row)
        cfg, _ = config_from_args(parser, argv)
        try:  # as launch/run.py resolves it: the row's preset filled in, its explicit flags winning
            cfg = presets.apply(cfg, presets.explicit_fields(parser, argv))
            cfg.replace(world_size=int(row["nprocs"])).validate()
        except ConfigError as err:
            raise SweepError(f"{where}: row {i} ({rid}) with nprocs {row['nprocs']}: {err}") from None


def row_argv(row: Mapping[str, Any]) -> list[str]:
    """The row's flags as command-line arguments (`--nfp 8`, `--augment` / `--no-augment`)."""
    argv: list[str] = []
    for k, v in row.items():
        if k in META or _cell(v) == "":
            continue
        flag = "--" + k.replace("_", "-")
        cell = _cell(v)
        if cell.lower() in ("true", "false"):
            argv.append(flag if cell.lower() == "true" else f"--no-{k.replace('_', '-')}")
        else:
            argv += [flag, cell]
    return argv


def launcher_command(launcher: str, nprocs: int, script: str, *, port: int | None = None,
                     cpu: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The command prefix and extra environment that start `nprocs` processes of `script` on this node
    (``ghostsys.run.launchers.launcher_command``, with a SweepError naming the fix)."""
    try:
        return _launcher_command(launcher, nprocs, script, port=port, cpu=cpu)
    except ValueError as err:
        raise SweepError(str(err)) from None


def row_command(row: Mapping[str, Any], out_dir: str | Path, *, port: int | None = None,
                cpu: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The full command (and extra env) that runs one row with its results in `out_dir`, from any cwd."""
    script = str(script_path(row))
    cmd, env = launcher_command(_cell(row["launcher"]), int(row["nprocs"]), script, port=port, cpu=cpu)
    return cmd + row_argv(row) + ["--out", str(Path(out_dir).absolute())], env


def default_results(table: str | Path) -> Path:
    """Where a table's runs go unless told otherwise: runs/sweeps/<table file stem>/."""
    return Path("runs") / "sweeps" / Path(table).stem
