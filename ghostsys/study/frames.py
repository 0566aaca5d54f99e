"""Tidy DataFrames for the analysis notebooks: training curves, checker rows, profile rows, landscape bands, tuning.

Every loader takes any set of paths (run directories, folders holding them, globs; see
``ghostsys.study.results.find_runs``) and returns an empty DataFrame, never an error, when nothing of
its kind is there: the notebooks work with whatever subset of results exists. A results folder may mix
kinds; each run directory is one of

- ``check``: the equivalence checker's (``check.jsonl`` beside its ``summary.json``);
- ``profile``: a profiled run (``launch/profile.py``: ``"profile": true`` in its summary);
- ``train``: any other training run (``launch/run.py``, sweep tables).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ghostsys.run.rundir import read_jsonl
from ghostsys.study.results import find_runs, load, load_metrics

if TYPE_CHECKING:
    import pandas as pd

Paths = "str | Path | Iterable[str | Path]"

# Config fields that say HOW a run is factorized or run, not WHAT it computes: runs equal in every other
# field (and in G_M) are the same experiment, whatever mode, engine or launcher produced them.
HOW = {"mode", "engine", "nfp", "ghost_groups", "world_size", "nprocs", "stats_policy", "buffer_sync",
       "sync_group_size", "zero_stage", "deepspeed_config", "device", "out", "progress", "num_workers",
       "collective_timeout", "eval_every", "checkpoint_every", "keep_checkpoints", "max_steps", "epochs",
       "landscape_lrs", "landscape_every", "preset", "local_rank"}
NORM_NAMES = {"batch": "BatchNorm", "ghost": "GhostNorm", "seq": "SeqNorm", "group": "GroupNorm",
              "noisy": "Noisy BatchNorm", "none": "no normalization"}


def _empty(columns: Iterable[str] = ()) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame(columns=list(columns))


def _kind(d: Path, summary: dict[str, Any]) -> str:
    if (d / "check.jsonl").exists():
        return "check"
    return "profile" if summary.get("profile") is True else "train"


def runs(paths: Paths, kind: str | None = "train") -> "pd.DataFrame":
    """One row per run (ghostsys.study.load) with `kind`, `G_M`, `policy`, `variant` and `experiment`; only `kind` runs."""
    df = load(paths)
    if df.empty:
        return df
    df["kind"] = [_kind(Path(r["run_dir"]), r) for r in df.to_dict("records")]
    if kind is not None:
        df = df[df["kind"] == kind].copy()
    if df.empty or "effective_gm" not in df:
        return df.iloc[0:0]
    df = df[df["status"] == "complete"].copy()
    df["G_M"] = df["effective_gm"].astype(int)
    recs = df.to_dict("records")
    df["policy"] = [stats_policy(r) for r in recs]
    df["variant"] = [variant(r) for r in recs]
    df["experiment"] = [experiment(r) for r in recs]
    df["norm_label"] = [norm_label(r) for r in recs]
    return df.reset_index(drop=True)


def _i(r: dict[str, Any], key: str, default: int = 1) -> int:
    v = r.get(key)
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)


def stats_policy(r: dict[str, Any]) -> str:
    """What evaluation's running statistics are, in words: the policy that differs between modes."""
    world = _i(r, "world_size")
    if r.get("buffer_sync") == "allreduce" and world > 1:
        return "buffers all-reduced over ranks"
    if r.get("mode") == "layer":
        per = "once per forward (mean of groups)" if r.get("stats_policy", "mean") == "mean" else "once per ghost group"
        base = f"EMA {per}"
    else:
        base = "EMA once per micro-batch" if _i(r, "nfp") > 1 else "EMA once per step"
    if world > 1 and r.get("mode") != "syncbn":
        base += ", rank 0's (DDP broadcast)" if r.get("engine") == "accelerate" else ", rank 0's (DeepSpeed: ranks drift)"
    return base


def variant(r: dict[str, Any]) -> str:
    """A short label of how a run was factorized: mode, engine, n_g x n_fp x G_layer, policy."""
    eng = "" if r.get("engine", "accelerate") == "accelerate" else f" {r['engine']}"
    pol = {"layer": f", stats {r.get('stats_policy', 'mean')}"}.get(r.get("mode"), "")
    if r.get("buffer_sync") == "allreduce":
        pol += ", allreduce"
    return f"{r.get('mode')}{eng}: {_i(r, 'world_size')}x{_i(r, 'nfp')}x{_i(r, 'ghost_groups')}{pol}"


def norm_family(norm: str) -> str:
    """GhostNorm and BatchNorm are one family: which of them a run uses is the factorization, not the experiment."""
    return "batch" if norm in ("batch", "ghost") else norm


def experiment(r: dict[str, Any]) -> str:
    """Every config field that changes what is computed (HOW fields dropped), plus G_M: equal key, same experiment."""
    skip = HOW | {"norm", "cfg.norm"}
    cfg = {k: r.get(k) for k in sorted(r) if k in _CONFIG_FIELDS and k not in skip}
    return f"G_M={r.get('effective_gm')};norm={norm_family(str(r.get('norm')))};" + ";".join(f"{k}={v}" for k, v in cfg.items())


def _config_fields() -> set[str]:
    import dataclasses

    from ghostsys.run.config import RunConfig

    return {f.name for f in dataclasses.fields(RunConfig)}


_CONFIG_FIELDS = _config_fields()


def norm_label(r: dict[str, Any]) -> str:
    """The normalization a run effectively trains with: BatchNorm is G_M = 1, any G_M > 1 of the family is GhostNorm."""
    norm, gm = str(r.get("norm")), int(r.get("effective_gm", 1))
    if norm in ("batch", "ghost"):
        return "BatchNorm (G_M=1)" if gm == 1 else f"GhostNorm (G_M={gm})"
    if norm == "seq":
        return f"SeqNorm (G_C={r.get('channel_groups')}, G_M={gm})"
    if norm == "group":
        return f"GroupNorm (G_C={r.get('channel_groups')})"
    return NORM_NAMES.get(norm, norm)


_RUN_COLS = ("run_dir", "G_M", "mode", "engine", "world_size", "nfp", "ghost_groups", "policy", "variant", "experiment",
             "norm", "norm_label", "seed", "factorization", "channel_groups")


def curves(paths: Paths) -> "pd.DataFrame":
    """One row per (training run, step): train/eval loss and accuracy with the run's G_M, mode, policy, variant."""
    r = runs(paths)
    if r.empty:
        return _empty(("run_dir", "step", "train_loss", "eval_loss", *_RUN_COLS[1:]))
    m = load_metrics(r["run_dir"].tolist())
    if m.empty:
        return _empty(("run_dir", "step", "train_loss", "eval_loss", *_RUN_COLS[1:]))
    # A resumed run may log a step twice (before the kill and after the resume): the last line is the run's.
    m = m.drop_duplicates(["run_dir", "step"], keep="last")
    keep = [c for c in _RUN_COLS if c in r]
    return m.merge(r[keep], on="run_dir", how="inner").sort_values(["G_M", "variant", "step"]).reset_index(drop=True)


def overlap(c: "pd.DataFrame", metric: str = "train_loss") -> "pd.DataFrame":
    """Per experiment and step: the spread (max - min) of `metric` over its factorizations, and over G_M values.

    ``within``: runs of one experiment (same G_M, all else equal but how it ran) -- equivalent factorizations,
    which must overlap; ``across G_M``: the same experiment at different G_M (max - min of the per-G_M means),
    the size of a real difference for scale.
    """
    import pandas as pd

    c = c.dropna(subset=[metric])
    if c.empty:
        return _empty(("step", "G_M", "spread", "runs", "compared"))
    within = (c.groupby(["experiment", "G_M", "step"])[metric].agg(spread=lambda v: v.max() - v.min(), runs="size")
              .reset_index())
    within = within[within["runs"] >= 2].assign(compared="factorizations of one G_M")
    base = c.assign(rest=c["experiment"].str.split(";", n=1).str[1])
    per_gm = base.groupby(["rest", "G_M", "step"])[metric].mean().reset_index()
    across = (per_gm.groupby(["rest", "step"])[metric].agg(spread=lambda v: v.max() - v.min(), runs="size")
              .reset_index())
    across = across[across["runs"] >= 2].assign(G_M=-1, compared="across G_M values")
    out = pd.concat([within.drop(columns="experiment"), across.drop(columns="rest")], ignore_index=True)
    return out[["compared", "G_M", "step", "spread", "runs"]]


def final_eval(c: "pd.DataFrame") -> "pd.DataFrame":
    """Each run's last evaluation (loss, accuracy) and last training loss, with its policy; only runs that evaluated."""
    if c.empty or "eval_loss" not in c:
        return _empty(("run_dir", "G_M", "variant", "policy", "eval_loss", "eval_acc", "train_loss"))
    ev = c.dropna(subset=["eval_loss"])
    last = ev.sort_values("step").groupby("run_dir").tail(1)
    cols = [k for k in ("run_dir", "G_M", "mode", "engine", "variant", "policy", "experiment", "step", "eval_loss",
                        "eval_acc", "train_loss") if k in last]
    return last[cols].sort_values(["G_M", "variant"]).reset_index(drop=True)


# --- the equivalence checker ------------------------------------------------------------------------------


def _check_dirs(paths: Paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dirs: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.name == "check.jsonl" and p.is_file():
            dirs[p.parent] = None
        elif p.is_dir():
            dirs |= {f.parent: None for f in sorted(p.rglob("check.jsonl"))}
    return list(dirs)


def checks(paths: Paths) -> "pd.DataFrame":
    """Every checker row (check.jsonl) under `paths`, with `check_run`, `precision`, `world_size`, `variant`, `ratio`."""
    import json

    import pandas as pd

    frames = []
    for d in _check_dirs(paths):
        rows = read_jsonl(d / "check.jsonl")
        if not rows:
            continue
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        env = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else {}
        df = pd.DataFrame(rows)
        world = env.get("world_size") or summary.get("world_size") or _world(df)
        df["precision"] = summary.get("precision", "?")
        df["world_size"] = world
        df["check_run"] = f"{d.name}: {summary.get('engine', df['engine'].iloc[0])}, n_g {world}, {df['precision'].iloc[0]}"
        frames.append(df)
    if not frames:
        return _empty(("check_run", "section", "variant", "quantity", "max_rel", "tol", "ratio", "passed"))
    df = pd.concat(frames, ignore_index=True)
    df["variant"] = [_check_variant(r) for r in df.to_dict("records")]
    df["ratio"] = df["max_rel"] / df["tol"]
    return df


def check_summary(k: "pd.DataFrame") -> "pd.DataFrame":
    """One row per checker run: comparisons passed, the worst err/tol among them, each control's err/tol and verdict."""
    import pandas as pd

    out = []
    for run, r in k.groupby("check_run", sort=False):
        comp, ctrl = r[~r["section"].isin(["control", "facts"])], r[r["section"] == "control"]
        out.append({"check run": run, "passed": f"{int(comp['passed'].sum())}/{len(comp)}",
                    "worst err/tol": comp["ratio"].max(),
                    "control err/tol (must exceed 100)": ", ".join(
                        f"{q} {x:.2g} ({v})" for q, x, v in zip(ctrl["quantity"], ctrl["ratio"], ctrl["verdict"]))})
    return pd.DataFrame(out)


def _world(df: "pd.DataFrame") -> int:
    m = df["factorization"].astype(str).str.extract(r"n_g (\d+)")[0].dropna()
    return int(m.astype(int).max()) if len(m) else 1


def _check_variant(r: dict[str, Any]) -> str:
    if r["section"] == "control":
        return f"NEGATIVE CONTROL: {r['factorization']}"
    f = str(r["factorization"]).split(" = ", 1)[-1]
    pol = str(r.get("policy") or "").replace("buffers engine", "").strip(", ") if r.get("policy") else ""
    return f"{r['mode']}: {f}" + (f" [{pol}]" if pol else "")


# --- profiles, landscape, tuning ----------------------------------------------------------------------------


def profiles(paths: Paths) -> "pd.DataFrame":
    """One row per profiled run (launch/profile.py), with `mem_mib` (peak memory) and `machine` (what it ran on)."""
    df = runs(paths, kind="profile")
    if df.empty:
        return df
    df["mem_mib"] = df["peak_mem_bytes"].astype(float) / 2**20
    df["machine"] = [machine(r) for r in df.to_dict("records")]
    return df


PROFILE_TABLE = ("mode", "world_size", "scaling", "nfp", "batch_size", "samples_per_s", "step_time_median_s",
                 "scaling_efficiency", "collective_share", "exposed_collective_share", "mem_mib")


def profile_table(p: "pd.DataFrame") -> "pd.DataFrame":
    """The main columns of profile rows (those present: a run without traced steps has no collectives' share)."""
    cols = [c for c in PROFILE_TABLE if c in p]
    return p.sort_values([c for c in ("mode", "nfp", "world_size") if c in p])[cols].reset_index(drop=True)


def machine(r: dict[str, Any]) -> str:
    """Where and how a profile row was measured: CPU or GPU, threads per process, torch version."""
    dev = r.get("env.gpu") or r.get("env.device_name") if r.get("env.cuda_available") else r.get("env.cpu")
    return f"{dev or r.get('device', '?')}, {r.get('threads_per_process', '?')} thread(s)/process, torch {r.get('env.torch', '?')}"


def measured_on(p: "pd.DataFrame") -> str:
    """The machine(s) of profile rows and the range of the 1-minute load average while they ran."""
    if p.empty:
        return ""
    load = p["loadavg_1m_start"].dropna().astype(float) if "loadavg_1m_start" in p else p.iloc[0:0]
    text = "; ".join(p["machine"].unique())
    return text + (f"; 1-min load {load.min():.1f}..{load.max():.1f}" if len(load) else "")


def landscape(paths: Paths) -> "pd.DataFrame":
    """One row per (probed run, probed step): landscape_min/max and the run's norm label, seed, G_M."""
    r = runs(paths)
    if r.empty:
        return _empty(("run_dir", "step", "landscape_min", "landscape_max", "norm_label"))
    m = load_metrics(r["run_dir"].tolist())
    if m.empty or "landscape_min" not in m:
        return _empty(("run_dir", "step", "landscape_min", "landscape_max", "norm_label"))
    m = m.dropna(subset=["landscape_min"]).drop_duplicates(["run_dir", "step"], keep="last")
    keep = [c for c in ("run_dir", "norm_label", "norm", "G_M", "seed", "experiment") if c in r]
    out = m[["run_dir", "step", "landscape_min", "landscape_max"]].merge(r[keep], on="run_dir")
    return out.sort_values(["norm_label", "seed", "step"]).reset_index(drop=True)


def band_phases(b: "pd.DataFrame") -> "pd.DataFrame":
    """Mean band (landscape_max - landscape_min) per norm over the early, middle and late third of the probed steps."""
    if b.empty:
        return _empty(("early", "middle", "late"))
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
        return _empty(cols)
    r = r[(r["mode"] == "layer") & r["norm"].isin(["ghost", "seq"])].dropna(subset=[metric])
    if r.empty:
        return _empty(cols)
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
