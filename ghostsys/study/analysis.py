"""The short real CPU sweep behind the analysis notebooks (``make analysis``), and running them against it.

Five parts, each a results folder under ``<out>/results/`` that one notebook reads:

- ``modes``: digits + SimpleNet at G_M 1, 2, 4, 8, every G_M by several factorizations (explicit layer,
  accumulation, 2-process unsynced / SyncBN through torchrun, DeepSpeed), running-statistics policies;
- ``landscape``: the loss-landscape probe for BatchNorm, GhostNorm (G_M 16) and no normalization;
- ``tuning``: SeqNorm's G_C x G_M grid and the sequential strategy (stage 2's rows are grid cells);
- ``check``: the equivalence checker, 1 process in float64 and 2 processes in float32;
- ``profile``: launch/profile.py, unsynced vs SyncBN on 1 and 2 processes, accumulation over n_fp.

Training rows are sweep tables (``<out>/tables/*.csv``, ghostsys.study.sweep) whose results go to
``<results>/<row_id>/``: one-process rows run in this process, others through their launcher. The checker
and the profiler run through their entry scripts as subprocesses. A rerun skips everything finished.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ghostsys.run.launchers import free_port, launcher_command
from ghostsys.study.sweep import make_row, write_table

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("modes", "landscape", "tuning", "check", "profile")
NOTEBOOK_PART = {"modes": "modes", "landscape": "landscape", "tuning": "tuning", "equivalence": "check",
                 "cost": "profile"}
DIGITS = {"dataset": "digits", "model": "simplenet", "batch_size": 128, "progress": False}
MODES_BASE = {**DIGITS, "lr": 0.1, "momentum": 0.9, "epochs": 8, "eval_every": 5}
# The papers' MNIST optimization ([B] App. B.1): plain SGD at lr 0.4, no momentum, no weight decay.
PAPERS_SGD = {**DIGITS, "lr": 0.4, "momentum": 0.0, "weight_decay": 0.0}
TUNING_BASE = {**PAPERS_SGD, "epochs": 10}
PROBE_LRS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"
CHECKS = {"ng1-float64": ("python", 1, ["--dtype", "float64"]),
          "ng2-float32": ("torchrun", 2, ["--dtype", "float32"])}
PROFILES = {
    "scaling": ["--modes", "unsynced,syncbn", "--world-sizes", "1,2", "--scaling", "strong", "--batch-size", "32",
                "--steps", "8", "--warmup", "2", "--profiled-steps", "2"],
    "nfp": ["--modes", "accumulate", "--nfps", "1,2,4,8", "--world-sizes", "1", "--batch-size", "256", "--steps", "4",
            "--warmup", "2", "--profiled-steps", "0"],
}
PROFILE_COMMON = ["--model", "resnet20", "--launcher", "torchrun", "--no-progress"]


# --- the tables ------------------------------------------------------------------------------------------


def modes_rows(base: Mapping[str, Any], gms: Sequence[int] = (1, 2, 4, 8), nprocs: int = 2,
               policies_at: int = 4) -> list[dict[str, Any]]:
    """Every G_M by every mode that reaches it: layer and accumulation on one process, unsynced (and SyncBN for
    G_M 1) on `nprocs`; at G_M `policies_at` also the sequential stats policy, buffer all-reduce and DeepSpeed."""
    rows = []
    for gm in gms:
        rows.append(make_row({**base, "mode": "accumulate", "nfp": gm}, name=f"accumulate-gm{gm}"))
        if gm > 1:
            rows.append(make_row({**base, "mode": "layer", "ghost_groups": gm}, name=f"layer-gm{gm}"))
        if gm == policies_at:
            rows.append(make_row({**base, "mode": "layer", "ghost_groups": gm, "stats_policy": "sequential"},
                                 name=f"layer-seq-gm{gm}"))
        if nprocs > 1 and gm == 1:
            rows.append(make_row({**base, "mode": "syncbn"}, name=f"syncbn-n{nprocs}-gm1",
                                 launcher="torchrun", nprocs=nprocs))
        if nprocs > 1 and gm % nprocs == 0:
            flags = {**base, "mode": "unsynced", "nfp": gm // nprocs}
            rows.append(make_row(flags, name=f"unsynced-n{nprocs}-gm{gm}", launcher="torchrun", nprocs=nprocs))
            if gm == policies_at:
                rows.append(make_row({**flags, "buffer_sync": "allreduce"}, name=f"unsynced-allreduce-gm{gm}",
                                     launcher="torchrun", nprocs=nprocs))
                rows.append(make_row({**flags, "engine": "deepspeed"}, name=f"deepspeed-n{nprocs}-gm{gm}",
                                     launcher="deepspeed", nprocs=nprocs))
    return rows


def landscape_rows(base: Mapping[str, Any], seeds: Sequence[int] = (0, 1, 2), ghost_gm: int = 16,
                   lrs: str = PROBE_LRS) -> list[dict[str, Any]]:
    """BatchNorm, GhostNorm (G_M = ghost_gm) and no normalization, each probed at every step."""
    probe = {**base, "landscape_lrs": lrs, "landscape_every": 1}
    variants = [("batch", {"mode": "accumulate", "norm": "batch"}),
                (f"ghost-gm{ghost_gm}", {"mode": "layer", "norm": "ghost", "ghost_groups": ghost_gm}),
                ("none", {"mode": "accumulate", "norm": "none"})]
    return [make_row({**probe, **v, "seed": s}, name=f"{n}-s{s}") for n, v in variants for s in seeds]


def tuning_rows(base: Mapping[str, Any], gcs: Sequence[int] = (1, 2, 4), gms: Sequence[int] = (2, 4, 8, 16),
                seeds: Sequence[int] = (0, 1, 2)) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(stage-1 rows: GhostNorm over G_M, grid rows: SeqNorm over G_C x G_M), as launch/sweep.py writes them."""
    from ghostsys.study.tuning import grid_rows, stage1_rows

    return stage1_rows(base, gms, seeds), grid_rows(base, gcs, gms, seeds)


# --- running them ----------------------------------------------------------------------------------------


def run_here(row: Mapping[str, Any], results: str | Path) -> dict[str, Any]:
    """Train one one-process row in this process (its banner silenced); results in <results>/<row_id>/."""
    from ghostsys.run.config import RunConfig
    from ghostsys.run.presets import apply as apply_preset
    from ghostsys.run.train import train
    from ghostsys.study.landscape import LandscapeProbe
    from ghostsys.study.tuning import typed_flags

    flags = typed_flags({k: str(v) if not isinstance(v, bool) else str(v).lower() for k, v in row.items()})
    cfg = apply_preset(RunConfig(**flags), set(flags)).replace(out=str(Path(results) / row["row_id"]))
    probes = [LandscapeProbe(cfg.landscape_steps(), every=cfg.landscape_every)] if cfg.landscape_lrs else []
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, callbacks=probes)


def _spawn(cmd: list[str], env: Mapping[str, str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=f,
                              stderr=subprocess.STDOUT).returncode


def run_rows(rows: Sequence[Mapping[str, Any]], results: Path, log: Callable[[str], None] = print) -> list[str]:
    """Run every row not yet complete: one-process rows in this process, others through their launcher
    (ghostsys.study.runner.run_row: attempts recorded, output in <results>/logs/<row_id>.log); the failed row ids."""
    from ghostsys.study.runner import row_state, run_row

    failed = []
    for i, row in enumerate(rows, 1):
        if row_state(results, row)["state"] == "complete":
            continue
        t0 = time.perf_counter()
        if row["launcher"] == "python":
            run_here(row, results)
            code = 0
        else:
            (results / "logs").mkdir(parents=True, exist_ok=True)
            with open(results / "logs" / f"{row['row_id']}.log", "ab") as sink:
                code = run_row(row, results.absolute(), sink)
        log(f"  [{i}/{len(rows)}] {row['row_id']}: {'done' if code == 0 else f'FAILED (exit {code})'} "
            f"in {time.perf_counter() - t0:.1f} s")
        if code:
            failed.append(row["row_id"])
    return failed


def run_check(name: str, results: Path) -> int:
    """One checker run of CHECKS into <results>/<name>/ (skipped when its summary exists); its exit code."""
    launcher, nprocs, argv = CHECKS[name]
    out = results / name
    if (out / "summary.json").exists():
        return 0
    cmd, env = launcher_command(launcher, nprocs, "launch/check.py", port=None if nprocs == 1 else free_port())
    return _spawn(cmd + argv + ["--out", str(out.absolute())], env, results / "logs" / f"{name}.log")


def run_profile(name: str, results: Path) -> int:
    """One launch/profile.py sweep of PROFILES into <results>/<name>/ (it skips runs already profiled)."""
    out = results / name
    cmd = [sys.executable, "launch/profile.py", *PROFILES[name], *PROFILE_COMMON, "--out", str(out.absolute())]
    return _spawn(cmd, {}, results / "logs" / f"{name}.log")


def sweep(out: Path, parts: Sequence[str] = PARTS, log: Callable[[str], None] = print) -> list[str]:
    """Run the parts' tables, checks and profiles under <out>; returns what failed (empty: all done)."""
    failed: list[str] = []
    res = out / "results"
    for part in parts:
        t0 = time.perf_counter()
        log(f"{part}:")
        if part == "modes":
            failed += run_rows(write_rows(modes_rows(MODES_BASE), out / "tables" / "modes.csv"), res / "modes", log)
        elif part == "landscape":
            rows = landscape_rows({**PAPERS_SGD, "epochs": 8})
            failed += run_rows(write_rows(rows, out / "tables" / "landscape.csv"), res / "landscape", log)
        elif part == "tuning":
            failed += run_tuning(TUNING_BASE, out / "tables", res / "tuning", log)
        elif part == "check":
            for name in CHECKS:
                code = run_check(name, res / "check")
                log(f"  {name}: exit {code}")
                failed += [f"check {name}"] if code else []
        elif part == "profile":
            for name in PROFILES:
                code = run_profile(name, res / "profile")
                log(f"  {name}: exit {code}")
                failed += [f"profile {name}"] if code else []
        log(f"  ({time.perf_counter() - t0:.0f} s)")
    return failed


def run_tuning(base: Mapping[str, Any], tables: Path, results: Path, log: Callable[[str], None] = print,
               gcs: Sequence[int] = (1, 2, 4), gms: Sequence[int] = (2, 4, 8, 16), seeds: Sequence[int] = (0, 1, 2),
               well_within: float = 0.5, tie_within: float = 0.0) -> list[str]:
    """The grid and the sequential strategy as launch/sweep.py writes them: stage 1, its pick, stage 2's table.

    Stage 2's rows are SeqNorm(G_C, picked G_M) with the grid's flags, so they ARE grid cells (the same row ids):
    the sequential path runs through the grid, and nothing is trained twice.
    """
    from ghostsys.study import tuning

    stage1, grid = tuning_rows(base, gcs, gms, seeds)
    s1 = write_table(stage1, tables / "seqnorm_stage1.csv")
    failed = run_rows(stage1, results, log)
    failed += run_rows(write_rows(grid, tables / "seqnorm_grid.csv"), results, log)
    if failed:
        return failed
    pick = tuning.select_gm(tuning.candidate_stats(tuning.table_results(s1, results)), well_within, tie_within)
    stage2 = tuning.stage2_rows(base, pick.value, gcs, seeds)
    write_table(stage2, tables / "seqnorm_stage2.csv")
    in_grid = {r["row_id"] for r in grid} >= {r["row_id"] for r in stage2}
    log(f"  stage 1 picks G_M = {pick.value}; stage 2 ({len(stage2)} rows) {'= grid cells' if in_grid else 'runs:'}")
    return run_rows(stage2, results, log)


def write_rows(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Write the table (so the same rows also run with launch/sweep.py or SLURM) and return its rows."""
    write_table(rows, path)
    return rows


def run_notebooks(out: Path, names: Sequence[str] | None = None, log: Callable[[str], None] = print,
                  workers: int = 2) -> list[str]:
    """Execute the notebooks against <out>/results/<part>: executed .ipynb to <out>/notebooks, PNGs to <out>/figures."""
    from ghostsys.study.notebooks import execute_many, notebooks

    jobs = {name: (path, out / "notebooks" / f"{name}.ipynb",
                   {"results": str((out / "results" / NOTEBOOK_PART.get(name, name)).absolute()),
                    "figures": str((out / "figures").absolute())})
            for name, path in notebooks().items() if names is None or name in names}
    t0 = time.perf_counter()
    errors = execute_many(jobs, workers)
    for name, err in errors.items():
        # papermill names the failing cell; the partly executed notebook is written beside the others
        log(f"  {name}: {jobs[name][1]}" + (f"  FAILED: {str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)}"
                                            if err else ""))
    log(f"  ({time.perf_counter() - t0:.0f} s)")
    return [name for name, err in errors.items() if err]
