# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tuning SeqNorm: the full grid and the sequential strategy
#
# SeqNorm(`G_C`, `G_M`) is GroupNorm over `G_C` channel groups, then GhostNorm over `G_M` ghost groups.
# The full grid costs |G_C| × |G_M| runs per seed; the papers' sequential strategy |G_C| + |G_M|: stage 1
# tunes GhostNorm's `G_M` and takes the **largest** `G_M` that performs well (lowest spread among ties),
# stage 2 tunes `G_C` at that `G_M` (`ghostsys.study.tuning`). Does the cheap path land on the grid's best?

# %% tags=["parameters"]
results = "../runs/analysis/results/tuning"  # stage-1 (GhostNorm) and grid (SeqNorm) runs
figures = "../runs/analysis/figures"
metric = "eval_acc"
well_within = 0.5  # stage 1 "performs well": mean within this many accuracy points of the best
tie_within = 0.0  # ties: means within this many points; the lowest std wins

# %%
# %matplotlib inline
from pathlib import Path

from ghostsys.study import frames, plots

figures = Path(figures)
stats = frames.tuning_stats(results, metric)
path = frames.sequential_path(stats, well_within, tie_within)
if plots.have(stats, f"tuning runs (mode layer, norm ghost or seq) under {results}"):
    print(stats.drop(columns="candidate").to_string(index=False, float_format="{:.2f}".format))
    for stage in ("gm", "gc", "grid"):
        if path[stage] is not None:
            print(f"{stage}: {path[stage].value}  ({path[stage].reason})")
    print(path["note"])

# %%
plots.tuning_grid(stats, path, figures / "tuning_grid.png")
