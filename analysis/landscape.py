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
# # Loss landscape: BatchNorm, GhostNorm and no normalization
#
# The probe of Santurkar et al. as the papers use it: before every update, the training loss at
# `θ − η·g` for several step sizes `η` along the gradient; the band between the smallest and largest of
# those losses per step (median over seeds). A narrow band means the gradient predicts the loss well (a
# smoother landscape). The papers' Figures 2–3 find GhostNorm's band narrower than BatchNorm's early in
# training, and both far narrower than no normalization.

# %% tags=["parameters"]
results = "../runs/analysis/results/landscape"  # runs trained with --landscape-lrs
figures = "../runs/analysis/figures"

# %%
# %matplotlib inline
from pathlib import Path

from ghostsys.study import frames, plots

figures = Path(figures)
bands = frames.landscape(results)
if plots.have(bands, f"probed runs (--landscape-lrs) under {results}"):
    print("mean band (max - min loss) by third of training:")
    print(frames.band_phases(bands).to_string(float_format="{:.3f}".format))

# %%
plots.landscape_bands(bands, figures / "landscape_bands.png")
