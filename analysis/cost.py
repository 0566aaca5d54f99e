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
# # What each mode costs: throughput, scaling, collectives, memory
#
# Rows of `launch/profile.py`, one per profiled run: global samples/s over timed steps after warm-up,
# scaling efficiency against the one-process run of the same mode, the share of a step spent in
# collectives (SyncBN adds three all-reduces per BatchNorm layer), and peak memory. Each figure names the
# machine it was measured on: on a shared 2-core CPU the absolute numbers mean little, the ratios more.

# %% tags=["parameters"]
results = "../runs/analysis/results/profile"  # folder(s) of launch/profile.py --out
figures = "../runs/analysis/figures"

# %%
# %matplotlib inline
from pathlib import Path

from ghostsys.study import frames, plots

figures = Path(figures)
prof = frames.profiles(results)
if plots.have(prof, f"profile rows under {results}"):
    print(frames.profile_table(prof).to_string(index=False, float_format="{:.3g}".format))
    print("measured on:", frames.measured_on(prof))

# %% [markdown]
# ## Samples/s against device count (dashed: ideal), and scaling efficiency

# %%
plots.throughput(prof, figures / "cost_throughput.png")

# %% [markdown]
# ## The collectives' share: SyncBN against unsynced

# %%
plots.collectives(prof, figures / "cost_collectives.png")

# %% [markdown]
# ## Peak memory against `--nfp`
# More forward passes per step means smaller micro-batches: less activation memory at the same `M`.

# %%
plots.memory(prof, figures / "cost_memory.png")
