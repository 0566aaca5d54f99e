"""Seaborn figures for the analysis notebooks: each function returns a matplotlib Figure and, given a path,
saves it as a PNG with the rows behind it beside it as CSV (``<name>.png``, ``<name>.csv``).

Headless-safe: figures are ``matplotlib.figure.Figure`` objects, never pyplot's, so no backend is chosen
or needed here (saving a PNG uses Agg); a notebook shows them with ``%matplotlib inline``. Inputs are the
tidy frames of ``ghostsys.study.frames``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

DPI = 110
ZERO_FLOOR = 1e-9  # an exact zero drawn on a log axis


def have(df: "pd.DataFrame", what: str) -> bool:
    """True when `df` has rows; otherwise print that `what` is missing and return False (the caller skips it)."""
    if df is not None and len(df):
        return True
    print(f"no {what}: skipped (`make analysis` produces every kind of result)")
    return False


def save(fig: "Figure", path: str | Path | None, data: "pd.DataFrame | None" = None) -> "Figure":
    """Write fig as PNG to `path` (and `data`, the rows it shows, as CSV beside it); return fig."""
    if path is not None:
        path = Path(path).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
        if data is not None:
            data.to_csv(path.with_suffix(".csv"), index=False)
    return fig


@contextmanager
def _style(axes: str = "whitegrid") -> Iterator[None]:
    import seaborn as sns

    with sns.axes_style(axes), sns.plotting_context("notebook", font_scale=0.85):
        yield


def _figure(width: float, height: float, **kw: Any) -> tuple["Figure", Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(**kw)


def _gm_hue(df: "pd.DataFrame") -> tuple["pd.DataFrame", list[str]]:
    order = [f"G_M={g}" for g in sorted(df["G_M"].unique())]
    return df.assign(**{"ghost groups": [f"G_M={g}" for g in df["G_M"]]}), order


# --- modes ---------------------------------------------------------------------------------------------


def mode_curves(c: "pd.DataFrame", path: str | Path | None = None) -> "Figure | None":
    """Training loss, evaluation loss and accuracy per step: colour = G_M, line style = mode, one line per run."""
    import seaborn as sns

    if not have(c, "training runs"):
        return None
    d, order = _gm_hue(c)
    ev = d.dropna(subset=["eval_loss"]) if "eval_loss" in d else d.iloc[0:0]
    with _style():
        fig, axes = _figure(14, 4, ncols=3)
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
    with _style():
        fig, ax = _figure(7, 4)
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
    d, order = _gm_hue(fe)
    d = d.assign(run=[f"{v} | {p}" for v, p in zip(d["variant"], d["policy"])])
    with _style():
        fig, (a, b) = _figure(12, 1.2 + 0.32 * len(d), ncols=2, sharey=True)
        for ax, y, t in ((a, "eval_loss", "final eval loss"), (b, "eval_acc", "final eval accuracy")):
            sns.scatterplot(d, x=y, y="run", hue="ghost groups", hue_order=order, s=70, ax=ax, legend=ax is b)
            ax.set(title=t, xlabel=y, ylabel="")
    return save(fig, path, d)


# --- equivalence -----------------------------------------------------------------------------------------


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
    with _style("white"):
        fig, axes = _figure(12, 1.6 + 0.4 * sum(heights), nrows=len(runs), squeeze=False,
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


# --- cost ------------------------------------------------------------------------------------------------


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
    with _style():
        fig, (a, b) = _figure(11, 4, ncols=2)
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
    with _style():
        fig, ax = _figure(max(5, 1.6 * len(d)), 4)
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
    with _style():
        fig, ax = _figure(6, 4)
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


# --- landscape, tuning ----------------------------------------------------------------------------------


def landscape_bands(b: "pd.DataFrame", path: str | Path | None = None, label: str = "norm_label",
                    title: str = "loss along -g: min..max over the probed step sizes") -> "Figure | None":
    """The papers' Figures 2-3: per norm, the band between the min and max probe loss at each step
    (median over seeds), log scale; a wide band means a gradient that predicts the loss poorly."""
    import seaborn as sns

    if not have(b, "probed runs (--landscape-lrs)"):
        return None
    med = b.groupby([label, "step"])[["landscape_min", "landscape_max"]].median().reset_index()
    with _style():
        fig, ax = _figure(7, 4)
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
    from matplotlib.patches import Rectangle

    if not have(stats, "tuning runs (mode layer, norm ghost or seq)"):
        return None
    seq, ghost = stats[stats["stage"] == "seq"], stats[stats["stage"] == "ghost"]
    gms = sorted(set(stats["gm"]))
    vmin, vmax = stats["mean"].min(), stats["mean"].max()
    with _style():
        fig, (top, ax) = _figure(1.6 + 1.3 * len(gms), 2.6 + 0.7 * max(1, seq["gc"].nunique()), nrows=2,
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
