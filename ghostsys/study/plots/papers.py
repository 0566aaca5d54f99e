"""Figures of landscape.py and tuning.py: the papers' loss-landscape bands, SeqNorm's grid and sequential path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ghostsys.study.plots.base import figure, have, save, style

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def landscape_bands(b: "pd.DataFrame", path: str | Path | None = None, label: str = "norm_label",
                    title: str = "loss along -g: min..max over the probed step sizes") -> "Figure | None":
    """The papers' Figures 2-3: per norm, the band between the min and max probe loss at each step
    (median over seeds), log scale; a wide band means a gradient that predicts the loss poorly."""
    import seaborn as sns

    if not have(b, "probed runs (--landscape-lrs)"):
        return None
    med = b.groupby([label, "step"])[["landscape_min", "landscape_max"]].median().reset_index()
    with style():
        fig, ax = figure(7, 4)
        for (name, d), color in zip(med.groupby(label, sort=False), sns.color_palette(n_colors=med[label].nunique())):
            ax.fill_between(d["step"], d["landscape_min"], d["landscape_max"].clip(upper=1e3), alpha=0.35,
                            color=color, label=name)
        ax.set(yscale="log", xlabel="step", ylabel="training loss at theta - eta g", title=title)
        ax.legend(fontsize=8)
    return save(fig, path, med)


def tuning_grid(stats: "pd.DataFrame", sel: dict[str, Any], path: str | Path | None = None) -> "Figure | None":
    """SeqNorm's G_C x G_M grid (mean accuracy, +-std over seeds) under stage 1's GhostNorm row, with the sequential
    strategy's path: stage 1's pick (box), the stage-2 column it tunes at (dashed), its pick (star); grid best (o)."""
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    if not have(stats, "tuning runs (mode layer, norm ghost or seq)"):
        return None
    seq, ghost = stats[stats["stage"] == "seq"], stats[stats["stage"] == "ghost"]
    gms = sorted(set(stats["gm"]))
    vmin, vmax = stats["mean"].min(), stats["mean"].max()
    with style():
        fig, (top, ax) = figure(1.6 + 1.3 * len(gms), 2.6 + 0.7 * max(1, seq["gc"].nunique()), nrows=2,
                                 gridspec_kw={"height_ratios": [1, max(1, seq["gc"].nunique())]})
        for a, d, ylab in ((top, ghost.assign(gc="GhostNorm"), "stage 1"), (ax, seq, "SeqNorm G_C")):
            mean = d.pivot_table(index="gc", columns="gm", values="mean").reindex(columns=gms)
            text = d.assign(t=[f"{m:.1f}\n±{s:.1f}" if not math.isnan(s) else f"{m:.1f}" for m, s in
                               zip(d["mean"], d["std"])]).pivot_table(index="gc", columns="gm", values="t",
                                                                      aggfunc="first").reindex(columns=gms)
            sns.heatmap(mean, ax=a, annot=text.fillna(""), fmt="", cmap="viridis", vmin=vmin, vmax=vmax,
                        cbar=a is ax, cbar_kws={"label": "accuracy % (mean over seeds)"}, linewidths=0.5)
            a.set(xlabel="G_M" if a is ax else "", ylabel=ylab)
        col = {g: i for i, g in enumerate(gms)}
        if sel.get("gm") is not None:
            x = col[sel["gm"].value]
            top.add_patch(Rectangle((x, 0), 1, 1, fill=False, lw=3, ec="red"))
            if len(seq):
                ax.add_patch(Rectangle((x, 0), 1, seq["gc"].nunique(), fill=False, lw=2, ls="--", ec="red"))
        rows = {g: i for i, g in enumerate(sorted(seq["gc"].unique()))}
        if sel.get("gc") is not None:
            ax.plot(col[sel["gm"].value] + 0.82, rows[sel["gc"].value] + 0.22, marker="*", ms=16, color="red", mec="w")
        if sel.get("grid") is not None:
            g = sel["grid"].table[sel["grid"].table["chosen"]].iloc[0]
            ax.plot(col[int(g["gm"])] + 0.18, rows[int(g["gc"])] + 0.22, marker="o", ms=11, mfc="w", mec="k", mew=1.5)
        fig.suptitle(_path_title(sel, len(ghost), len(seq)), fontsize=9)
        keys = [Line2D([], [], color="red", lw=3, label="stage 1 pick (G_M)"),
                Line2D([], [], color="red", lw=2, ls="--", label="stage 2: G_C at that G_M"),
                Line2D([], [], color="red", marker="*", ms=12, lw=0, label="sequential pick"),
                Line2D([], [], marker="o", ms=9, mfc="w", mec="k", lw=0, label="grid best")]
        fig.legend(handles=keys, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return save(fig, path, stats)


def _path_title(sel: dict[str, Any], n_ghost: int, n_seq: int) -> str:
    parts = []
    if sel.get("gc") is not None:
        parts.append(f"sequential: G_M={sel['gm'].value} then G_C={sel['gc'].value} "
                     f"({n_ghost} + {len(sel['gc'].table)} candidates)")
    elif sel.get("gm") is not None:
        parts.append(f"stage 1 picks G_M={sel['gm'].value}")
    if sel.get("grid") is not None:
        g = sel["grid"].table[sel["grid"].table["chosen"]].iloc[0]
        parts.append(f"grid best: G_C={int(g['gc'])}, G_M={int(g['gm'])} ({n_seq} candidates)")
    return "; ".join(parts) or "SeqNorm tuning"
