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
# # Are the modes the same experiment? The checker's errors
#
# `launch/check.py` runs every mode and factorization of one target `G_M` through the real training code
# and compares each with an independent single-process reference: first-step logits and loss, every
# gradient, weights after `k` SGD steps, every rank's running statistics. Each cell is the worst relative
# error of one variant on one tensor **divided by its tolerance** (log scale, 0 = at the tolerance; blue
# passes). The **negative control** (BatchNorm `G_M = 1` against the target) must differ by more than
# 100 × its tolerance (above the black line of the colour bar), so the checker cannot pass by comparing a
# thing with itself. float64 tolerances are analytic (1e-10); float32 ones are derived in the run.

# %% tags=["parameters"]
results = "../runs/analysis/results/check"  # folder(s) holding check.jsonl files (launch/check.py --out)
figures = "../runs/analysis/figures"

# %%
# %matplotlib inline
from pathlib import Path

from ghostsys.study import frames, plots

figures = Path(figures)
rows = frames.checks(results)
if plots.have(rows, f"checker rows (check.jsonl) under {results}"):
    print(frames.check_summary(rows).to_string(index=False, float_format="{:.2g}".format))

# %%
plots.check_heatmap(rows, figures / "equivalence_heatmap.png")

# %% [markdown]
# ## Running statistics, in words (each statement measured by the checker)

# %%
for r in frames.check_facts(rows).itertuples():
    print(f"[{r.verdict}] {r.statement} ({r.expect}; measured {r.measured}, tol {r.tol})")
