"""The ``study`` wing: from runs to pictures (imports ``run`` and ``nn``).

``results`` turns any set of run directories into one pandas DataFrame::

    from ghostsys.study import load
    df = load(["runs/"])        # one row per run
"""

from ghostsys.study.results import load, load_metrics

__all__ = ["load", "load_metrics"]
