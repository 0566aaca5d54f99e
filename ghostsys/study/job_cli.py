"""`launch/sweep.py run|submit|collect`: run a table's rows here, submit them to SLURM, collect their results.

A row's results go to <results>/<row_id>/ (default results: runs/sweeps/<table name>/), whoever runs it.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import shlex
import sys
from pathlib import Path

from ghostsys.study.sweep import SweepError, check_rows, default_results, read_table


def _table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", type=Path, help="the sweep table (CSV)")
    p.add_argument("--results", type=Path, default=None,
                   help="folder holding one results directory per row (default: runs/sweeps/<table name>)")


def _load(args: argparse.Namespace) -> tuple[list[dict], Path]:
    """The table's rows, each checked before anything runs, and the absolute results folder."""
    rows = read_table(args.table)
    if not rows:
        raise SweepError(f"{args.table} has no rows; add one row per run")
    check_rows(rows, str(args.table))
    return rows, (args.results or default_results(args.table)).absolute()


# --- run ----------------------------------------------------------------------------------------

def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run rows here, one after another, skipping complete ones")
    _table_args(p)
    p.add_argument("--row", type=int, action="append", default=None, metavar="I",
                   help="run only row I (0-based; repeat for several); default: every row")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ghostsys.study.runner import run_rows

    rows, results = _load(args)
    indices = args.row if args.row is not None else list(range(len(rows)))
    bad = [i for i in indices if not 0 <= i < len(rows)]
    if bad:
        raise SweepError(f"--row {bad[0]} is out of range: {args.table} has {len(rows)} rows, 0 to {len(rows) - 1}")
    return run_rows(rows, indices, results, progress=args.progress)


# --- submit -------------------------------------------------------------------------------------

def _add_submit(sub: argparse._SubParsersAction) -> None:
    from ghostsys.study.slurm import DEFAULT_SITE, site_fields
    from ghostsys.run.config import field_docs
    from ghostsys.study.slurm import Site

    p = sub.add_parser("submit", help="submit the table's unfinished rows as SLURM array job(s)")
    _table_args(p)
    p.add_argument("--site", type=Path, default=None,
                   help=f"INI file whose [slurm] section sets the options below (default: {DEFAULT_SITE} if it exists)")
    docs = field_docs(Site)
    for f in site_fields():
        p.add_argument("--" + f.name.replace("_", "-"), type=int if f.type in ("int", int) else str, default=None,
                       help=f"{docs.get(f.name, '')} (default: {f.default!r})".replace("%", "%%"))
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands instead of submitting")
    p.set_defaults(func=_submit)


def _job_name(results: Path) -> str:
    # One name per results folder: its jobs are found again (squeue --name) to refuse a double submission.
    return f"ghostsys-{results.name}-{hashlib.sha256(str(results).encode()).hexdigest()[:6]}"


def _submit(args: argparse.Namespace) -> int:
    import subprocess

    from ghostsys.study.runner import row_state
    from ghostsys.study.slurm import DEFAULT_SITE, load_site, require, sbatch_commands, site_fields, submit

    rows, results = _load(args)
    site_file = args.site if args.site is not None else (DEFAULT_SITE if DEFAULT_SITE.is_file() else None)
    site = load_site(site_file, {f.name: getattr(args, f.name) for f in site_fields()})
    todo: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        if row_state(results, row)["state"] != "complete":
            todo.setdefault(int(row["nprocs"]), []).append(i)
    if not todo:
        print(f"all {len(rows)} rows of {args.table} are complete in {results}: nothing to submit", file=sys.stderr)
        return 0
    name = _job_name(results)
    commands = sbatch_commands(args.table, results, todo, site, name)
    if args.dry_run:
        for cmd, env in commands:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if v), shlex.join(cmd))
        return 0
    require("sbatch")
    queued = subprocess.run([require("squeue"), "-h", "-u", getpass.getuser(), "--name", name, "-o", "%i"],
                            capture_output=True, text=True, timeout=60)
    if queued.returncode != 0:
        raise SweepError(f"squeue failed ({queued.stderr.strip()[:200]}); is the SLURM controller reachable?")
    if queued.stdout.split():
        ids = ", ".join(queued.stdout.split())
        raise SweepError(f"jobs of this sweep are still queued or running ({ids}); wait for them, or scancel them "
                         "before submitting again")
    logs = results / "logs"
    made = not logs.exists()
    logs.mkdir(parents=True, exist_ok=True)  # SLURM opens the task logs there: it must exist first
    ids: list[str] = []
    try:
        for (cmd, env), (nprocs, indices) in zip(commands, sorted(todo.items())):
            ids.append(submit(cmd, env))
            print(f"submitted {len(indices)} row(s) of {nprocs} process(es) as array job {ids[-1]} "
                  f"(--array={cmd[3].split('=', 1)[1]}); logs: {logs}/{ids[-1]}_<row>.out", file=sys.stderr)
    except SweepError:
        if made and not ids:
            for d in (logs, results):
                if d.exists() and not any(d.iterdir()):
                    d.rmdir()
        raise
    print(f"watch: squeue -j {','.join(ids)}    collect: launch/sweep.py collect {args.table}"
          + (f" --results {args.results}" if args.results else ""), file=sys.stderr)
    print(",".join(ids))
    return 0


# --- collect ------------------------------------------------------------------------------------

SHOWN = ("row_id", "state", "mode", "engine", "world_size", "nfp", "effective_gm", "steps", "final_train_loss",
         "eval_loss", "eval_acc")


def _add_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="gather every row's results into one table; list failed or missing rows")
    _table_args(p)
    p.add_argument("--csv", type=Path, default=None, help="where the table goes (default: <results>/results.csv)")
    p.set_defaults(func=_collect)


def _collect(args: argparse.Namespace) -> int:
    import pandas as pd

    from ghostsys.study.runner import collect

    rows, results = _load(args)
    if args.csv is not None and not args.csv.parent.is_dir():
        raise SweepError(f"--csv {args.csv}: folder {args.csv.parent} does not exist; create it or pick another")
    df = collect(rows, results)
    if results.is_dir():
        csv = args.csv or results / "results.csv"
        df.to_csv(csv, index=False)
        print(f"{len(df)} rows -> {csv}")
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(df[[c for c in SHOWN if c in df.columns]].to_string(index=False))
    bad = df[df["state"] != "complete"]
    for _, r in bad.iterrows():
        where = [f"exit {int(r['exit_code'])}" if pd.notna(r.get("exit_code")) else "",
                 f"job {r['slurm_array_job_id']}_{r['slurm_array_task_id']}" if pd.notna(r.get("slurm_array_job_id")) else "",
                 f"log {r['log']}" if pd.notna(r.get("log")) else ""]
        print(f"{r['state']}: {r['row_id']}" + "".join(f", {w}" for w in where if w), file=sys.stderr)
    if len(bad):
        print(f"{len(bad)} of {len(df)} rows are not complete; `launch/sweep.py submit {args.table}` (or run) "
              "runs them again, resuming where they stopped", file=sys.stderr)
        return 1
    return 0


def add_all(sub: argparse._SubParsersAction) -> None:
    """Add the job subcommands."""
    for add in (_add_run, _add_submit, _add_collect):
        add(sub)
