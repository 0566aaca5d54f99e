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
# # Modes compared: one experiment, three mechanisms
#
# GhostNorm with `G_M` ghost groups arises three ways: an explicit layer, gradient accumulation with
# BatchNorm (`--nfp`), and data parallel training with unsynced BatchNorm. Runs of the same `G_M` (and
# everything else equal) are the same experiment: their **training** curves must overlap whatever mode,
# engine or launcher produced them. **Evaluation** uses the running statistics, and there the modes
# genuinely differ (once per micro-batch, once per forward, rank 0's buffers, ...): this notebook shows where.

# %% tags=["parameters"]
results = "../runs/analysis/results/modes"  # run folder(s): a path or a list of paths
figures = "../runs/analysis/figures"  # where the PNGs (and the rows behind them, as CSV) go

# %%
# %matplotlib inline
from pathlib import Path

from ghostsys.study import frames, plots

figures = Path(figures)
curves = frames.curves(results)
if plots.have(curves, f"training runs under {results}"):
    print(f"{curves['run_dir'].nunique()} runs; G_M {sorted(curves['G_M'].unique().tolist())}; modes {sorted(curves['mode'].unique().tolist())}")

# %% [markdown]
# ## Loss and accuracy per mode and `G_M`
# Colour is `G_M`, line style the mode: in training loss, lines of one colour lie on top of each other.

# %%
plots.mode_curves(curves, figures / "modes_curves.png")

# %% [markdown]
# ## Equivalent factorizations overlap
# For each `G_M`, the spread (max − min) of the training loss over its factorizations at every step,
# against the spread between different `G_M` values of the same setup: float roundoff against a real difference.

# %%
spread = frames.overlap(curves)
if len(spread):
    print(spread.groupby(["compared", "G_M"])["spread"].max().to_string())
plots.factorization_overlap(spread, figures / "modes_overlap.png")

# %% [markdown]
# ## Where running-statistics policies make evaluation differ
# Runs of one `G_M` train identically; their last evaluation differs only through the running statistics
# each policy leaves. `layer --stats-policy sequential` updates the EMA once per ghost group, as BatchNorm
# under accumulation does; `mean` once per forward; data parallel evaluates rank 0's buffers unless
# `--buffer-sync allreduce`.

# %%
last = frames.final_eval(curves)
if len(last):
    print(last[["G_M", "variant", "policy", "train_loss", "eval_loss", "eval_acc"]]
          .to_string(index=False, float_format="{:.6f}".format))
plots.eval_policies(last, figures / "modes_eval_policies.png")
