"""`launch/sweep.py grid|sequential`: write SeqNorm tuning tables (CSV, one row per run: flags + seed).

Each subcommand is one small function pair (``add_*`` builds its parser, ``cmd_*`` runs it):
parse -> table -> write. Everything after ``--`` is launch/run.py flags shared by every row.
"""

from __future__ import annotations

import argparse

from ghostsys.study.sweep import LAUNCHERS, SweepError, default_results, read_table, write_table


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4,8") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 0, e.g. 1,2,4,8")
    return values


def _run_flags(argv: list[str]) -> dict:
    """launch/run.py flags after `--`, as config fields (only those given); argparse refuses bad ones."""
    from ghostsys.run.cli import build_parser, config_from_args
    from ghostsys.run.presets import explicit_fields

    parser = build_parser("launch/run.py (after --)", "run flags shared by every row")
    parser.usage = "launch/sweep.py SUBCOMMAND [options] -- [launch/run.py flags]"
    cfg, _ = config_from_args(parser, argv)
    given = explicit_fields(parser, argv) - {"local_rank"}
    for own, fix in (("out", "each row's results go to <results>/<row_id>/"), ("nprocs", "use launch/sweep.py --nprocs")):
        if own in given:
            raise SweepError(f"--{own} cannot be a run flag of a sweep table: {fix}")
    return {k: getattr(cfg, k) for k in sorted(given)}


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", default="python", choices=LAUNCHERS, help="launcher every row runs under (default: python)")
    p.add_argument("--nprocs", type=int, default=1, help="processes per row (n_g; default 1)")
    p.add_argument("--seeds", type=_ints, default=[0, 1], help="comma-separated seeds, one row each (default: 0,1)")


def _check_launch(args: argparse.Namespace) -> None:
    if args.nprocs < 1:
        raise SweepError(f"--nprocs must be >= 1 (got {args.nprocs})")
    if args.launcher == "python" and args.nprocs != 1:
        raise SweepError(f"--launcher python starts one process; use --launcher torchrun for --nprocs {args.nprocs}")


def _write(rows: list[dict], out: str) -> None:
    path = write_table(rows, out)
    print(f"wrote {path}: {len(rows)} rows (results go to {default_results(path)}/<row_id>/)")


# --- grid ----------------------------------------------------------------------------------------


def cmd_grid(args: argparse.Namespace, run_argv: list[str]) -> None:
    """The full SeqNorm grid G_C x G_M x seeds."""
    from ghostsys.study.tuning import grid_rows

    _check_launch(args)
    rows = grid_rows(_run_flags(run_argv), args.gc, args.gm, args.seeds, launcher=args.launcher, nprocs=args.nprocs)
    _write(rows, args.out)


def add_grid(sub: argparse._SubParsersAction) -> None:
    """`grid`: one row per (G_C, G_M, seed) of SeqNorm."""
    p = sub.add_parser("grid", help="the full SeqNorm grid over G_C x G_M")
    p.add_argument("--gc", type=_ints, required=True, help="channel groups G_C, e.g. 1,2,4,8,16")
    p.add_argument("--gm", type=_ints, required=True, help="ghost groups G_M (global), e.g. 1,2,4,8,16")
    _launch_args(p)
    p.add_argument("--out", default="sweeps/seqnorm_grid.csv", help="table to write (default: sweeps/seqnorm_grid.csv)")
    p.set_defaults(func=cmd_grid, run_flags=True)


# --- sequential ----------------------------------------------------------------------------------


def cmd_sequential(args: argparse.Namespace, run_argv: list[str]) -> None:
    """Stage 1 (GhostNorm over G_M) or stage 2 (SeqNorm over G_C at the G_M stage 1 picked)."""
    from ghostsys.study import tuning

    if args.stage == 1:
        if args.gm is None:
            raise SweepError("--stage 1 tunes G_M: pass --gm, e.g. --gm 2,4,8,16")
        _check_launch(args)
        rows = tuning.stage1_rows(_run_flags(run_argv), args.gm, args.seeds, launcher=args.launcher, nprocs=args.nprocs)
        _write(rows, args.out or "sweeps/seqnorm_stage1.csv")
        return
    if args.stage1 is None or args.gc is None:
        raise SweepError("--stage 2 needs --stage1 TABLE (stage 1's table) and --gc, e.g. --gc 1,2,4,8,16")
    if run_argv:
        raise SweepError("--stage 2 takes its run flags from the stage-1 table; drop the flags after --")
    if args.well_within < 0 or args.tie_within < 0:
        raise SweepError(f"--well-within and --tie-within must be >= 0 accuracy points "
                         f"(got {args.well_within}, {args.tie_within})")
    stage1 = read_table(args.stage1)
    results = args.results or default_results(args.stage1)
    runs = tuning.table_results(args.stage1, results, args.metric)
    pick = tuning.select_gm(tuning.candidate_stats(runs, args.metric), args.well_within, args.tie_within)
    print(pick.table.drop(columns=["candidate"]).to_string(index=False))
    print(f"stage 1 pick: G_M = {pick.value} ({pick.reason})")
    launcher, nprocs = stage1[0]["launcher"], int(stage1[0]["nprocs"])
    rows = tuning.stage2_rows(tuning.base_flags(stage1), pick.value, args.gc, args.seeds, launcher=launcher, nprocs=nprocs)
    _write(rows, args.out or "sweeps/seqnorm_stage2.csv")


def add_sequential(sub: argparse._SubParsersAction) -> None:
    """`sequential`: the papers' two-stage strategy, one table per stage."""
    p = sub.add_parser("sequential", help="the papers' sequential strategy: stage 1 over G_M, stage 2 over G_C")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: GhostNorm over G_M; 2: SeqNorm over G_C")
    p.add_argument("--gm", type=_ints, help="stage 1: ghost groups G_M (global), e.g. 2,4,8,16")
    p.add_argument("--gc", type=_ints, help="stage 2: channel groups G_C, e.g. 1,2,4,8,16")
    p.add_argument("--stage1", help="stage 2: stage 1's table")
    p.add_argument("--results", help="stage 2: where stage 1's runs are (default: runs/sweeps/<stage-1 table stem>/)")
    p.add_argument("--metric", default="eval_acc", help="summary metric to tune on (default: eval_acc)")
    p.add_argument("--well-within", type=float, default=0.5,
                   help="performs well: mean within this many accuracy points of the best mean (default: 0.5)")
    p.add_argument("--tie-within", type=float, default=0.0,
                   help="ties: means within this many points; lowest std wins (default: 0 = the same mean)")
    _launch_args(p)
    p.add_argument("--out", help="table to write (default: sweeps/seqnorm_stage<N>.csv)")
    p.set_defaults(func=cmd_sequential, run_flags=True)


def add_all(sub: argparse._SubParsersAction) -> None:
    """Add the table writers' subcommands."""
    add_grid(sub)
    add_sequential(sub)
