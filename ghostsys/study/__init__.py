"""The ``study`` wing: from runs to pictures (imports ``run`` and ``nn``).

``results`` turns any set of run directories into one pandas DataFrame::

    from ghostsys.study import load
    df = load(["runs/"])        # one row per run (training, check and profile runs alike)
    ranks = load_ranks(["runs/profile"])  # one row per (profiled run, rank)

``sweep`` (sweep tables and the command that runs a row), ``runner`` (run rows here, their states,
``collect``) and ``slurm`` (site options, the sbatch commands) are what ``launch/sweep.py`` drives.
"""

from ghostsys.study.results import load, load_metrics, load_ranks

__all__ = ["load", "load_metrics", "load_ranks"]
