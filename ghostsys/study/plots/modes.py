"""Figures of modes.py: curves per mode and G_M, the overlap of equivalent factorizations, evaluation by policy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ghostsys.study.plots.base import ZERO_FLOOR, figure, gm_hue, have, save, style

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def mode_curves(c: "pd.DataFrame", path: str | Path | None = None) -> "Figure | None":
    """Training loss, evaluation loss and accuracy per step: colour = G_M, line style = mode, one line per run."""
    import seaborn as sns

    if not have(c, "training runs"):
        return None
    d, order = gm_hue(c)
    ev = d.dropna(subset=["eval_loss"]) if "eval_loss" in d else d.iloc[0:0]
    with style():
        fig, axes = figure(14, 4, ncols=3)
        kw = dict(hue="ghost groups", hue_order=order, style="mode", units="run_dir", estimator=None)
        for ax, data, y, title in ((axes[0], d, "train_loss", "training loss (batch statistics)"),
                                   (axes[1], ev, "eval_loss", "evaluation loss (running statistics)"),
                                   (axes[2], ev, "eval_acc", "evaluation accuracy (running statistics)")):
            if len(data):
                sns.lineplot(data, x="step", y=y, ax=ax, legend=ax is axes[2], marker="o" if data is ev else None,
                             **kw)
            ax.set(title=title, ylabel=y, yscale="log" if "loss" in y else "linear")
        if axes[2].get_legend():
            sns.move_legend(axes[2], "upper left", bbox_to_anchor=(1.02, 1))
    cols = [k for k in ("run_dir", "G_M", "mode", "variant", "step", "train_loss", "eval_loss", "eval_acc") if k in c]
    return save(fig, path, c[cols])


def factorization_overlap(ov: "pd.DataFrame", path: str | Path | None = None) -> "Figure | None":
    """Per step, max - min of the training loss over runs that must agree (factorizations of one G_M) vs across G_M."""
    import seaborn as sns

    if not have(ov, "G_M values with two or more factorizations of one setup"):
        return None
    d = ov.assign(what=[f"{w} (G_M={g}, {n} runs)" if g > 0 else f"{w} ({n} values)"
                        for w, g, n in zip(ov["compared"], ov["G_M"], ov["runs"])],
                  drawn=ov["spread"].clip(lower=ZERO_FLOOR))
    with style():
        fig, ax = figure(7, 4)
        sns.lineplot(d, x="step", y="drawn", hue="what", marker="o", ax=ax)
        ax.set(yscale="log", ylabel="max - min of train loss",
               title=f"equivalent factorizations overlap (exact zeros drawn at {ZERO_FLOOR:g})")
        ax.legend(fontsize=8)
    return save(fig, path, d.drop(columns="drawn"))


def eval_policies(fe: "pd.DataFrame", path: str | Path | None = None) -> "Figure | None":
    """Final evaluation loss and accuracy of every run, grouped by G_M: runs of one G_M differ only by their
    running-statistics policy (their training losses agree), so any gap here is the policy's."""
    import seaborn as sns

    if not have(fe, "evaluated runs"):
        return None
    d, order = gm_hue(fe)
    d = d.assign(run=[f"{v} | {p}" for v, p in zip(d["variant"], d["policy"])])
    with style():
        fig, (a, b) = figure(12, 1.2 + 0.32 * len(d), ncols=2, sharey=True)
        for ax, y, t in ((a, "eval_loss", "final eval loss"), (b, "eval_acc", "final eval accuracy")):
            sns.scatterplot(d, x=y, y="run", hue="ghost groups", hue_order=order, s=70, ax=ax, legend=ax is b)
            ax.set(title=t, xlabel=y, ylabel="")
    return save(fig, path, d)
