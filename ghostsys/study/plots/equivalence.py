"""Figure of equivalence.py: the checker's error / tolerance per variant x tensor, the negative control."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ghostsys.study.plots.base import figure, have, save, style

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def check_heatmap(k: "pd.DataFrame", path: str | Path | None = None) -> "Figure | None":
    """log10(error / tolerance) per variant x tensor, one panel per checker run: below 0 (blue) is within the
    tolerance; the NEGATIVE CONTROL row must be above 2 (red: > 100 x tol); cells are annotated with max_rel."""
    import numpy as np
    import seaborn as sns

    if not have(k, "checker rows (check.jsonl)"):
        return None
    k = k[k["section"] != "facts"].assign(log_ratio=lambda x: np.log10(x["ratio"].clip(lower=1e-12)))
    runs = list(dict.fromkeys(k["check_run"]))
    quantities = sorted(k["quantity"].unique(), key=lambda q: (_ORDER.index(q) if q in _ORDER else len(_ORDER), q))
    heights = [max(2, k[k["check_run"] == r]["variant"].nunique()) for r in runs]
    with style("white"):
        fig, axes = figure(12, 1.6 + 0.4 * sum(heights), nrows=len(runs), squeeze=False,
                            gridspec_kw={"height_ratios": heights})
        for ax, r in zip(axes[:, 0], runs):
            sub = k[k["check_run"] == r]
            rows = sorted(sub["variant"].unique(), key=lambda v: (not v.startswith("NEGATIVE"), v))
            val = sub.pivot_table(index="variant", columns="quantity", values="log_ratio", aggfunc="max")
            text = sub.assign(t=[_cell(r) for r in sub.to_dict("records")]).pivot_table(
                index="variant", columns="quantity", values="t", aggfunc="first")
            val, text = val.reindex(index=rows, columns=quantities), text.reindex(index=rows, columns=quantities)
            sns.heatmap(val, ax=ax, cmap="RdBu_r", center=0, vmin=-8, vmax=8, annot=text.fillna(""), fmt="",
                        annot_kws={"fontsize": 7}, linewidths=0.5, cbar_kws={"label": "log10(max_rel / tol)",
                                                                             "ticks": [-8, -4, 0, 2, 4, 8]})
            tol = sub[sub["section"] != "control"]["tol"]
            ax.set(xlabel="", ylabel="", title=f"{r}; tolerance {_tol_range(tol)}")
            ax.tick_params(axis="x", labelrotation=15)
            ax.collections[0].colorbar.ax.axhline(2, color="k", lw=1)
    return save(fig, path, k.drop(columns="log_ratio"))


_ORDER = ["logits", "loss", "grads", "weights"]


def _cell(r: dict[str, Any]) -> str:
    """max_rel, and the verdict where it is not a plain pass (FAIL, weak, unresolved, SAME)."""
    v = r["max_rel"]
    text = "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0e}"
    verdict = str(r.get("verdict") or "")
    return text if verdict in ("ok", "differs", "") else f"{text}\n{verdict}"


def _tol_range(tol: "pd.Series") -> str:
    if tol.empty:
        return "-"
    lo, hi = tol.min(), tol.max()
    return f"{lo:.0e}" if lo == hi else f"{lo:.0e} .. {hi:.0e} (derived per tensor)"
