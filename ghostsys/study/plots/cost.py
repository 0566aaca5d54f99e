"""Figures of cost.py: throughput against device count, the collectives' share, peak memory against n_fp."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ghostsys.study.plots.base import figure, have, save, style

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def _varied(p: "pd.DataFrame", key: list[str], col: str) -> "pd.DataFrame":
    """Rows of the groups (by `key`) measured at more than one value of `col`."""
    if p.empty:
        return p
    return p[p.groupby(key)[col].transform("nunique") > 1]


def throughput(p: "pd.DataFrame", path: str | Path | None = None) -> "Figure | None":
    """Samples/s against device count per mode (dashed: ideal = n x one device), and the scaling efficiency."""
    import seaborn as sns

    d = _varied(p[p["scaling"].isin(["base", "strong"])] if len(p) else p, ["mode", "engine", "mixed_precision", "nfp"],
                "world_size")
    if not have(d, "modes profiled at more than one device count (strong scaling)"):
        return None
    d = d.sort_values(["mode", "world_size"])
    with style():
        fig, (a, b) = figure(11, 4, ncols=2)
        palette = dict(zip(sorted(d["mode"].unique()), sns.color_palette(n_colors=d["mode"].nunique())))
        sns.lineplot(d, x="world_size", y="samples_per_s", hue="mode", palette=palette, marker="o", ax=a)
        for mode, g in d.groupby("mode"):
            base = g[g["world_size"] == 1]["samples_per_s"]
            if len(base):
                a.plot(g["world_size"], g["world_size"] * base.iloc[0], ls="--", color=palette[mode], alpha=0.6)
        a.set(xticks=sorted(d["world_size"].unique()), xlabel="devices (processes)", ylabel="samples/s (global)",
              title="strong scaling (dashed: ideal)")
        eff = d[d["world_size"] > 1].assign(run=lambda x: [f"{m}\nn={n}" for m, n in zip(x["mode"], x["world_size"])])
        b.bar(eff["run"], eff["scaling_efficiency"], color=[palette[m] for m in eff["mode"]])
        for x, v in zip(eff["run"], eff["scaling_efficiency"]):
            b.annotate(f"{100 * v:.0f}%", (x, v), ha="center", va="bottom")
        b.axhline(1, color="k", lw=1, ls="--")
        b.set(ylabel="throughput(n) / (n x throughput(1))", title="scaling efficiency")
    _caption(fig, d)
    return save(fig, path, d[[c for c in _PROFILE_COLS if c in d]])


_PROFILE_COLS = ("row_id", "mode", "engine", "mixed_precision", "world_size", "scaling", "batch_size", "nfp",
                 "effective_gm", "samples_per_s", "step_time_median_s", "step_time_p90_s", "scaling_efficiency",
                 "collective_share", "exposed_collective_share", "peak_mem_bytes", "mem_mib", "mem_per_sample_bytes",
                 "machine")
CALLERS = ("grad", "syncbn", "buffer_sync", "loss_stats")


def collectives(p: "pd.DataFrame", path: str | Path | None = None) -> "Figure | None":
    """The collectives' share of step time by caller (stacked), and the share not hidden behind compute (dots)."""
    traced = "collective_share" in p and len(p)
    d = p[(p["world_size"] > 1) & p["collective_share"].notna()] if traced else p.iloc[0:0]
    if not have(d, "multi-process profile rows with traced steps (--profiled-steps)"):
        return None
    d = d.sort_values(["mode", "world_size"])
    d = d.assign(run=[f"{m}\nn={n}, n_fp={f}" for m, n, f in zip(d["mode"], d["world_size"], d["nfp"])])
    with style():
        fig, ax = figure(max(5, 1.6 * len(d)), 4)
        bottom = [0.0] * len(d)
        for caller in CALLERS:
            col = f"collective_share_{caller}"
            if col not in d:
                continue
            vals = d[col].fillna(0).tolist()
            ax.bar(d["run"], vals, bottom=bottom, label=caller)
            bottom = [x + y for x, y in zip(bottom, vals)]
        ax.scatter(d["run"], d["exposed_collective_share"], color="k", zorder=3, label="exposed (not overlapped)")
        ax.set(ylabel="share of profiled step time", ylim=(0, 1), title="collectives' share: SyncBN vs unsynced")
        ax.legend(fontsize=8)
    _caption(fig, d)
    cols = ["run", *[c for c in _PROFILE_COLS if c in d], *[f"collective_share_{c}" for c in CALLERS if f"collective_share_{c}" in d]]
    return save(fig, path, d[cols])


def memory(p: "pd.DataFrame", path: str | Path | None = None) -> "Figure | None":
    """Peak memory against n_fp (gradient accumulation: smaller micro-batches), per mode and device count."""
    import seaborn as sns

    d = _varied(p, ["mode", "engine", "world_size", "batch_size"], "nfp")
    if not have(d, "profile rows over several --nfp values"):
        return None
    d = d.sort_values("nfp").assign(group=lambda x: [f"{m}, n={w}, M={b}" for m, w, b in
                                                     zip(x["mode"], x["world_size"], x["batch_size"])])
    with style():
        fig, ax = figure(6, 4)
        sns.lineplot(d, x="nfp", y="mem_mib", hue="group", marker="o", ax=ax)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(xticks=sorted(d["nfp"].unique()), xticklabels=sorted(d["nfp"].unique()),
               xlabel="n_fp (forward passes per step)", ylabel=f"peak memory, MiB ({_mem_kind(d)})",
               title="peak memory vs --nfp")
    _caption(fig, d)
    return save(fig, path, d[["group", *[c for c in _PROFILE_COLS if c in d]]])


def _mem_kind(d: "pd.DataFrame") -> str:
    kinds = d["peak_mem_kind"].dropna().unique() if "peak_mem_kind" in d else []
    return "peak RSS" if len(kinds) and "RSS" in kinds[0] else "device max allocated" if len(kinds) else "?"


def _caption(fig: "Figure", d: "pd.DataFrame") -> None:
    from ghostsys.study.frames import measured_on

    if "machine" in d and len(d):
        fig.text(0.0, 0.0, "measured on: " + measured_on(d), fontsize=7, va="bottom")
        fig.get_layout_engine().set(h_pad=0.25)
