"""Seaborn figures for the analysis notebooks: each function returns a matplotlib Figure and, given a path,
saves it as a PNG with the rows behind it beside it as CSV (``<name>.png``, ``<name>.csv``).

Headless-safe: figures are ``matplotlib.figure.Figure`` objects, never pyplot's, so no backend is chosen
or needed here (saving a PNG uses Agg); a notebook shows them with ``%matplotlib inline``. Inputs are the
tidy frames of ``ghostsys.study.frames``.

One module per notebook: ``modes``, ``equivalence``, ``cost``, ``papers`` (landscape, tuning); ``base``
holds what they share.
"""

from ghostsys.study.plots.base import have, save
from ghostsys.study.plots.cost import collectives, memory, throughput
from ghostsys.study.plots.equivalence import check_heatmap
from ghostsys.study.plots.modes import eval_policies, factorization_overlap, mode_curves
from ghostsys.study.plots.papers import landscape_bands, tuning_grid

__all__ = ["check_heatmap", "collectives", "eval_policies", "factorization_overlap", "have", "landscape_bands",
           "memory", "mode_curves", "save", "throughput", "tuning_grid"]
