"""Tidy DataFrames for the analysis notebooks: training curves, checker rows, profile rows, landscape bands, tuning.

Every loader takes any set of paths (run directories, folders holding them, globs; see
``ghostsys.study.results.find_runs``) and returns an empty DataFrame, never an error, when nothing of
its kind is there: the notebooks work with whatever subset of results exists. A results folder may mix
kinds; each run directory is one of

- ``check``: the equivalence checker's (``check.jsonl`` beside its ``summary.json``);
- ``profile``: a profiled run (``launch/profile.py``: ``"profile": true`` in its summary);
- ``train``: any other training run (``launch/run.py``, sweep tables).

``runs`` (training runs, curves, overlap of factorizations, final evaluations), ``checks`` (checker rows),
``profiles`` (profile rows), ``papers`` (landscape bands, SeqNorm tuning).
"""

from ghostsys.study.frames.checks import check_facts, check_summary, checks
from ghostsys.study.frames.papers import band_phases, landscape, sequential_path, tuning_stats
from ghostsys.study.frames.profiles import machine, measured_on, profile_table, profiles
from ghostsys.study.frames.runs import (HOW, curves, experiment, final_eval, norm_label, overlap, runs, stats_policy,
                                        variant)

__all__ = ["HOW", "band_phases", "check_facts", "check_summary", "checks", "curves", "experiment", "final_eval", "landscape",
           "machine", "measured_on", "norm_label", "overlap", "profile_table", "profiles", "runs", "sequential_path",
           "stats_policy", "tuning_stats", "variant"]
