"""Tuning SeqNorm(G_C, G_M) as sweep tables: the full grid, and the papers' sequential strategy.

[B] Section 3.2.1: the grid over G_C x G_M costs Theta(|G_C| |G_M|) runs; the sequential strategy
Theta(|G_C| + |G_M|): **stage 1** tunes GhostNorm's G_M, takes "the largest g_M for which the network
performs well (amongst similarly performing models, the one with the lowest variance)"; **stage 2**
tunes G_C of SeqNorm(G_C, g_M). On CIFAR-100 both strategies found G_C = 4, G_M = 8.

The rule, made precise here (means and spreads over seeds of the tuning metric, in accuracy points,
i.e. 100 x ``eval_acc``; the std is the sample std, ddof = 1):

1. **performs well**: a candidate's mean is within ``well_within`` points of the best candidate's mean;
2. the pick is the **largest G_M** among those that perform well;
3. **ties**: well-performing candidates whose mean is within ``tie_within`` points of the pick's mean
   (and candidates with the pick's own G_M reached another way) tie with it; among ties the **lowest
   std** wins, then the larger G_M. ``tie_within = 0`` is [B] Table 1's "same mean performance".
   [B]'s CIFAR-10 choice is consistent: G_M in (2, 4, 8) performed alike; it adopted 8, both the
   largest and the lowest-variance one.

Stage 2's pick (and the grid's best) is the best mean, ties (within ``tie_within``) to the lowest
std, then the larger G_C.

G_M is placed as the explicit layer's groups over the launched processes: ``--mode layer`` with
``--ghost-groups G_M / (n_g n_fp)`` (n_fp from the run flags, default 1), so every row of a table
has the G_M it names whatever launcher runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ghostsys.run.config import ConfigError, RunConfig
from ghostsys.run.presets import apply as apply_preset
from ghostsys.study.sweep import META, SweepError, make_row, read_table

__all__ = ["ghost_placement", "grid_rows", "stage1_rows", "stage2_rows", "candidate_stats", "select_gm",
           "select_best", "table_results", "Selection", "SWEPT"]

# Fields the tuning tables set themselves: run flags that name them would contradict the table.
SWEPT = ("mode", "norm", "ghost_groups", "channel_groups", "seed")


def ghost_placement(gm: int, nprocs: int, nfp: int = 1) -> int:
    """G_layer so that n_g x n_fp x G_layer = gm; SweepError naming the valid G_M if it does not divide."""
    if gm < 1 or gm % (nprocs * nfp):
        raise SweepError(f"G_M {gm} cannot be placed on {nprocs} process(es) x {nfp} pass(es): G_M must be a positive "
                         f"multiple of n_g x n_fp = {nprocs * nfp} (e.g. {nprocs * nfp}, {2 * nprocs * nfp}, ...)")
    return gm // (nprocs * nfp)


def check_flags(flags: Mapping[str, Any], nprocs: int, where: str) -> None:
    """Refuse a row whose run would be refused: the resolved RunConfig must validate on `nprocs` processes."""
    try:
        cfg = apply_preset(RunConfig(**flags), set(flags))
        cfg.replace(world_size=nprocs, nprocs=0).validate()
    except ConfigError as err:
        raise SweepError(f"{where}: {err}") from None


def _base_checked(base: Mapping[str, Any]) -> dict[str, Any]:
    clash = sorted(set(base) & set(SWEPT))
    if clash:
        raise SweepError(f"the run flags set {', '.join('--' + c.replace('_', '-') for c in clash)}, which the tuning "
                         "table sets itself; drop them")
    return dict(base)


def _rows(base: Mapping[str, Any], variants: Iterable[tuple[str, dict[str, Any]]], seeds: Sequence[int], *,
          launcher: str, nprocs: int) -> list[dict[str, Any]]:
    if not seeds:
        raise SweepError("--seeds is empty; give one or more seeds, e.g. 0,1,2")
    rows = []
    for name, flags in variants:
        for seed in seeds:
            row_flags = {**base, **flags, "seed": seed}
            check_flags(row_flags, nprocs, f"row {name}-s{seed}")
            rows.append(make_row(row_flags, name=f"{name}-s{seed}", launcher=launcher, nprocs=nprocs))
    return rows


def _nfp(base: Mapping[str, Any]) -> int:
    return int(base.get("nfp", 1))


def grid_rows(base: Mapping[str, Any], gcs: Sequence[int], gms: Sequence[int], seeds: Sequence[int], *,
              launcher: str = "python", nprocs: int = 1) -> list[dict[str, Any]]:
    """The full SeqNorm grid: one row per (G_C, G_M, seed)."""
    base = _base_checked(base)
    variants = [(f"seq-gc{gc}-gm{gm}", {"mode": "layer", "norm": "seq", "channel_groups": gc,
                                        "ghost_groups": ghost_placement(gm, nprocs, _nfp(base))})
                for gc in gcs for gm in gms]
    return _rows(base, variants, seeds, launcher=launcher, nprocs=nprocs)


def stage1_rows(base: Mapping[str, Any], gms: Sequence[int], seeds: Sequence[int], *, launcher: str = "python",
                nprocs: int = 1) -> list[dict[str, Any]]:
    """Sequential strategy, stage 1: GhostNorm over G_M, one row per (G_M, seed)."""
    base = _base_checked(base)
    variants = [(f"ghost-gm{gm}", {"mode": "layer", "norm": "ghost", "ghost_groups": ghost_placement(gm, nprocs, _nfp(base))})
                for gm in gms]
    return _rows(base, variants, seeds, launcher=launcher, nprocs=nprocs)


def stage2_rows(base: Mapping[str, Any], gm: int, gcs: Sequence[int], seeds: Sequence[int], *, launcher: str = "python",
                nprocs: int = 1) -> list[dict[str, Any]]:
    """Sequential strategy, stage 2: SeqNorm(G_C, gm) over G_C, one row per (G_C, seed)."""
    base = _base_checked(base)
    variants = [(f"seq-gc{gc}-gm{gm}", {"mode": "layer", "norm": "seq", "channel_groups": gc,
                                        "ghost_groups": ghost_placement(gm, nprocs, _nfp(base))}) for gc in gcs]
    return _rows(base, variants, seeds, launcher=launcher, nprocs=nprocs)


# --- selection ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What a selection picked, and the per-candidate table it picked from."""

    value: int  # the chosen G_M (stage 1) or G_C (stage 2 / grid)
    candidate: str  # its candidate key
    mean: float  # accuracy points
    std: float
    reason: str
    table: Any  # pandas DataFrame: one row per candidate (key, gm, gc, n, mean, std, well, tie, chosen)


def candidate_stats(runs: Any, metric: str = "eval_acc") -> Any:
    """One row per candidate (runs equal but for the seed): G_M, G_C, n, mean and std of 100 x metric."""
    import pandas as pd

    missing = [c for c in ("candidate", "effective_gm", metric) if c not in runs.columns]
    if missing:
        raise SweepError(f"results lack column(s) {', '.join(missing)}; were the runs complete?")
    df = runs.assign(points=100.0 * runs[metric].astype(float))
    g = df.groupby("candidate", sort=False)
    out = pd.DataFrame({
        "gm": g["effective_gm"].first().astype(int),
        "gc": g["channel_groups"].first() if "channel_groups" in df else 1,
        "n": g["points"].size(),
        "mean": g["points"].mean(),
        "std": g["points"].std(ddof=1),  # NaN for one seed: ranked after any known spread
    })
    return out.reset_index()


def _lowest_std_then(cands: Any, larger: str) -> Any:
    std = cands["std"].fillna(math.inf)
    return cands.assign(_std=std).sort_values(["_std", larger], ascending=[True, False]).iloc[0]


def select_gm(stats: Any, well_within: float = 0.5, tie_within: float = 0.0) -> Selection:
    """Stage 1: the largest G_M that performs well; ties with it (means within tie_within) to the lowest std."""
    if well_within < 0 or tie_within < 0:
        raise SweepError(f"--well-within and --tie-within must be >= 0 accuracy points (got {well_within}, {tie_within})")
    if stats.empty:
        raise SweepError("no stage-1 results to select from")
    best = stats["mean"].max()
    well = stats["mean"] >= best - well_within - 1e-9
    top = stats[well].sort_values(["gm", "mean"], ascending=[False, False]).iloc[0]
    tie = well & ((stats["mean"] - top["mean"]).abs() <= tie_within + 1e-9)
    tie |= well & (stats["gm"] == top["gm"])
    chosen = _lowest_std_then(stats[tie], "gm")
    table = stats.assign(well=well, tie=tie, chosen=stats["candidate"] == chosen["candidate"])
    reason = (f"best mean {best:.2f}; performs well = mean >= {best - well_within:.2f} (within {well_within} points): "
              f"G_M {sorted(stats[well]['gm'].tolist())}; largest {int(top['gm'])}; ties with it (within {tie_within} "
              f"points): G_M {sorted(stats[tie]['gm'].tolist())}; lowest std -> G_M {int(chosen['gm'])}")
    return Selection(int(chosen["gm"]), str(chosen["candidate"]), float(chosen["mean"]), float(chosen["std"]), reason, table)


def select_best(stats: Any, by: str = "gc", tie_within: float = 0.0) -> Selection:
    """Stage 2 (or a grid): the best mean; ties (means within tie_within points) to the lowest std, then larger `by`."""
    if tie_within < 0:
        raise SweepError(f"--tie-within must be >= 0 accuracy points (got {tie_within})")
    if stats.empty:
        raise SweepError("no results to select from")
    best = stats["mean"].max()
    tie = stats["mean"] >= best - tie_within - 1e-9
    chosen = _lowest_std_then(stats[tie], by)
    table = stats.assign(tie=tie, chosen=stats["candidate"] == chosen["candidate"])
    reason = (f"best mean {best:.2f}; ties within {tie_within} points: {by} {sorted(stats[tie][by].tolist())}; "
              f"lowest std -> {by} {int(chosen[by])}")
    return Selection(int(chosen[by]), str(chosen["candidate"]), float(chosen["mean"]), float(chosen["std"]), reason, table)


def candidate_key(row: Mapping[str, Any]) -> str:
    """A row's flags without the seed and the table's own columns: runs that differ only by seed share it."""
    return ";".join(f"{k}={row[k]}" for k in sorted(row) if k not in META and k != "seed")


def table_results(table: str | Path, results: str | Path, metric: str = "eval_acc") -> Any:
    """A table (e.g. stage 1's) joined with its runs' results (ghostsys.study.results.load), one row per run.

    Refuses (SweepError naming the rows) when any row has no complete result yet.
    """
    from ghostsys.study.results import load

    rows = read_table(table)
    runs = load([results]) if Path(results).is_dir() else None
    by_id: dict[str, dict] = {}
    if runs is not None and not runs.empty:
        for rec in runs.to_dict("records"):
            by_id[Path(rec["run_dir"]).name] = rec
    missing = [r["row_id"] for r in rows if by_id.get(r["row_id"], {}).get("status") != "complete"]
    if missing:
        raise SweepError(f"{len(missing)} of {len(rows)} row(s) of {table} have no complete result under {results} "
                         f"(e.g. {', '.join(missing[:3])}); run stage 1 first, or pass --results DIR where its runs are")
    import pandas as pd

    out = []
    for r in rows:
        rec = by_id[r["row_id"]]
        if metric not in rec or rec[metric] is None or (isinstance(rec[metric], float) and math.isnan(rec[metric])):
            raise SweepError(f"run {r['row_id']} has no {metric!r} in its summary; choose --metric from its summary keys")
        out.append({"row_id": r["row_id"], "candidate": candidate_key(r), "seed": r.get("seed"),
                    "effective_gm": rec["effective_gm"], "channel_groups": int(r.get("channel_groups", 1)),
                    metric: rec[metric]})
    return pd.DataFrame(out)


def typed_flags(cells: Mapping[str, str]) -> dict[str, Any]:
    """A table row's flag cells (strings) as RunConfig values; SweepError for a cell that is not a run flag."""
    import dataclasses

    kinds = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
    out: dict[str, Any] = {}
    for k, v in cells.items():
        if k in META:
            continue
        if k not in kinds:
            raise SweepError(f"column {k!r} is not a flag of launch/run.py")
        kind = kinds[k]
        try:
            if kind == "bool":
                if v.lower() not in ("true", "false"):
                    raise ValueError(v)
                out[k] = v.lower() == "true"
            elif kind.startswith("int"):
                out[k] = int(v)
            elif kind.startswith("float"):
                out[k] = float(v)
            else:
                out[k] = v
        except ValueError:
            raise SweepError(f"column {k!r} holds {v!r}, not a {kind}") from None
    return out


def base_flags(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The run flags every stage-1 row shares besides the swept ones (what stage 2 keeps), typed."""
    keys = set().union(*rows) - set(META) - set(SWEPT)
    shared = {k: rows[0].get(k) for k in keys if all(r.get(k) == rows[0].get(k) for r in rows)}
    varying = sorted(k for k in keys if k not in shared)
    if varying:
        raise SweepError(f"stage-1 rows differ in {', '.join(varying)} besides the swept flags; stage 2 needs one base")
    return typed_flags({k: v for k, v in shared.items() if v is not None})
