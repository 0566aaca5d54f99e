"""Training runs as tidy frames: one row per run (with its G_M, policy, variant and experiment), per step, per G_M.

Runs equal in everything but HOW they ran (mode, engine, launcher, factorization: ``HOW``) and of the same
G_M are one experiment; ``overlap`` measures how far apart they are, ``final_eval`` where their running
statistics make evaluation differ.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ghostsys.study.results import load, load_metrics

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


def empty(columns: Iterable[str] = ()) -> "pd.DataFrame":
    """A frame with no rows (what every loader returns when nothing of its kind is there)."""
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
    """A short label of how a run was factorized: mode, engine, n_g x n_fp x G_layer, policy (and dtype if not float32)."""
    eng = "" if r.get("engine", "accelerate") == "accelerate" else f" {r['engine']}"
    pol = {"layer": f", stats {r.get('stats_policy', 'mean')}"}.get(r.get("mode"), "")
    if r.get("buffer_sync") == "allreduce":
        pol += ", allreduce"
    dtype = "" if r.get("dtype", "float32") == "float32" else f", {r['dtype']}"
    return f"{r.get('mode')}{eng}: {_i(r, 'world_size')}x{_i(r, 'nfp')}x{_i(r, 'ghost_groups')}{pol}{dtype}"


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
        return empty(("run_dir", "step", "train_loss", "eval_loss", *_RUN_COLS[1:]))
    m = load_metrics(r["run_dir"].tolist())
    if m.empty:
        return empty(("run_dir", "step", "train_loss", "eval_loss", *_RUN_COLS[1:]))
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
        return empty(("step", "G_M", "spread", "runs", "compared"))
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
        return empty(("run_dir", "G_M", "variant", "policy", "eval_loss", "eval_acc", "train_loss"))
    ev = c.dropna(subset=["eval_loss"])
    last = ev.sort_values("step").groupby("run_dir").tail(1)
    cols = [k for k in ("run_dir", "G_M", "mode", "engine", "variant", "policy", "experiment", "step", "eval_loss",
                        "eval_acc", "train_loss") if k in last]
    return last[cols].sort_values(["G_M", "variant"]).reset_index(drop=True)
