"""The papers' experiments as tidy frames: loss-landscape bands, SeqNorm tuning candidates and the sequential path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ghostsys.study.frames.runs import Paths, empty, runs
from ghostsys.study.results import load_metrics

if TYPE_CHECKING:
    import pandas as pd


def landscape(paths: Paths) -> "pd.DataFrame":
    """One row per (probed run, probed step): landscape_min/max and the run's norm label, seed, G_M."""
    r = runs(paths)
    if r.empty:
        return empty(("run_dir", "step", "landscape_min", "landscape_max", "norm_label"))
    m = load_metrics(r["run_dir"].tolist())
    if m.empty or "landscape_min" not in m:
        return empty(("run_dir", "step", "landscape_min", "landscape_max", "norm_label"))
    m = m.dropna(subset=["landscape_min"]).drop_duplicates(["run_dir", "step"], keep="last")
    keep = [c for c in ("run_dir", "norm_label", "norm", "G_M", "seed", "experiment") if c in r]
    out = m[["run_dir", "step", "landscape_min", "landscape_max"]].merge(r[keep], on="run_dir")
    return out.sort_values(["norm_label", "seed", "step"]).reset_index(drop=True)


def band_phases(b: "pd.DataFrame") -> "pd.DataFrame":
    """Mean band (landscape_max - landscape_min) per norm over the early, middle and late third of the probed steps."""
    if b.empty:
        return empty(("early", "middle", "late"))
    w = b.assign(band=b["landscape_max"] - b["landscape_min"])
    third = w["step"].max() / 3
    w["phase"] = ["early" if s <= third else "middle" if s <= 2 * third else "late" for s in w["step"]]
    out = w.pivot_table(index="norm_label", columns="phase", values="band", aggfunc="mean")
    return out.reindex(columns=[c for c in ("early", "middle", "late") if c in out.columns])


def tuning_stats(paths: Paths, metric: str = "eval_acc") -> "pd.DataFrame":
    """Per tuning candidate (explicit-layer GhostNorm over G_M, SeqNorm over G_C x G_M): n, mean, std of 100 x metric."""
    from ghostsys.study.tuning import candidate_stats

    r = runs(paths)
    cols = ("stage", "candidate", "gm", "gc", "n", "mean", "std")
    if r.empty or metric not in r:
        return empty(cols)
    r = r[(r["mode"] == "layer") & r["norm"].isin(["ghost", "seq"])].dropna(subset=[metric])
    if r.empty:
        return empty(cols)
    r = r.assign(channel_groups=r["channel_groups"].where(r["norm"] == "seq", 1).astype(int),
                 candidate=[f"{n}-gc{gc}-gm{gm}" for n, gc, gm in zip(r["norm"], r["channel_groups"], r["G_M"])])
    stats = candidate_stats(r, metric)
    stats["stage"] = ["ghost" if c.startswith("ghost") else "seq" for c in stats["candidate"]]
    return stats[list(cols)].sort_values(["stage", "gc", "gm"]).reset_index(drop=True)


def sequential_path(stats: "pd.DataFrame", well_within: float = 0.5, tie_within: float = 0.0) -> dict[str, Any]:
    """The papers' sequential strategy over `stats`: stage 1 picks G_M among GhostNorm runs, stage 2 G_C at it.

    Returns {"gm": Selection | None, "gc": Selection | None, "grid": Selection | None, "note": str}: each
    missing stage is None and the note says why.
    """
    from ghostsys.study.tuning import select_best, select_gm

    ghost, seq = stats[stats["stage"] == "ghost"], stats[stats["stage"] == "seq"]
    out: dict[str, Any] = {"gm": None, "gc": None, "grid": None, "note": ""}
    if not seq.empty:
        out["grid"] = select_best(seq.reset_index(drop=True), "gc", tie_within)
    if ghost.empty:
        out["note"] = "no stage-1 (GhostNorm over G_M) runs: no sequential path"
        return out
    out["gm"] = select_gm(ghost.reset_index(drop=True), well_within, tie_within)
    at = seq[seq["gm"] == out["gm"].value]
    if at.empty:
        out["note"] = f"no SeqNorm runs at the picked G_M = {out['gm'].value}: stage 2 not run"
        return out
    out["gc"] = select_best(at.reset_index(drop=True), "gc", tie_within)
    return out
