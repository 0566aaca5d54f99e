"""Session fixtures shared by several test files: a real local Slurm cluster and one short real sweep on it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster on localhost (tests/_slurm.py); skips, saying why, where Slurm cannot be
    installed. SLURM_CONF points at it for the whole session; both daemons stop by PID at the end."""
    from tests._slurm import LocalSlurm, ensure_installed

    why = ensure_installed()
    if why:
        pytest.skip(why)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    env = pytest.MonkeyPatch()
    for k, v in cluster.env.items():
        env.setenv(k, v)
    try:
        yield cluster
    finally:
        cluster.stop()
        env.undo()


@pytest.fixture(scope="session")
def slurm_sweep(slurm_cluster, tmp_path_factory):
    """ONE short real sweep through SLURM, run once per session (tests/_slurm_sweep.py): a 4-row array job
    (python, accelerate, 2-process torchrun, 2-process DeepSpeed), a preemption drill and a multi-node-template
    run, all finished and collected. `.results` is the collected results folder, `.csv` its results.csv."""
    from tests._slurm_sweep import run_sweep

    return run_sweep(slurm_cluster, tmp_path_factory.mktemp("sweep"))
