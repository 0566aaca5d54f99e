"""Session fixtures shared by several test files: a real local Slurm cluster and one short real sweep on it, whose
equivalence table the end-to-end tests read (run here, without Slurm, where Slurm cannot be installed).

The sweep starts with the session's first test when any selected test needs it, and runs in the background
(Slurm's jobs, or one `launch/sweep.py run` process) while the other tests run: on 2 cores most tests leave one
idle. The first test that needs its results waits for the rest. Also: one real profile sweep and the checker's
float32 runs, shared by their own tests and the analysis notebooks' test."""

from __future__ import annotations

import pytest

SHARED = {"slurm_sweep", "study_sweep"}  # the fixtures whose runs start with the session


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
def slurm_sweep_started(slurm_cluster, tmp_path_factory):
    """The session's Slurm sweep, submitted (tests/_slurm_sweep.py: start_sweep) and waited for in the background."""
    from tests._slurm_sweep import start_sweep

    started = start_sweep(slurm_cluster, tmp_path_factory.mktemp("sweep"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def slurm_sweep(slurm_sweep_started):
    """ONE short real sweep through SLURM, run once per session (tests/_slurm_sweep.py): a 4-row array job
    (python, accelerate, 2-process torchrun, 2-process DeepSpeed), a preemption drill and a multi-node-template
    run, all finished and collected. `.results` is the collected results folder, `.csv` its results.csv;
    `.study` the equivalence table submitted with it (see study_sweep)."""
    return slurm_sweep_started.result()


@pytest.fixture(scope="session")
def study_here_started(tmp_path_factory):
    """Without Slurm: the equivalence table through `launch/sweep.py run`, in the background (start_here)."""
    from tests._slurm_sweep import start_here

    started = start_here(tmp_path_factory.mktemp("study"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def study_sweep(request):
    """The equivalence table (tests/_slurm_sweep.py: every mechanism of G_M = 4, SyncBN, the control), run once per
    session: through the real Slurm with slurm_sweep where Slurm is here, else through `launch/sweep.py run`
    (same table, same results layout). A StudySweep: `.results`, `.table`, `.run_dir(name)`, `.via`."""
    try:
        return request.getfixturevalue("slurm_sweep").study
    except pytest.skip.Exception:  # no Slurm on this machine: the same table, run here
        return request.getfixturevalue("study_here_started").result()


@pytest.fixture(scope="session", autouse=True)
def _shared_sweep_starts_with_the_session(request):
    """Start the shared sweep at the first test when a selected test needs it. What goes wrong here is raised
    again (pytest keeps a session fixture's error) in the tests that need the sweep, not in an unrelated one."""
    if not any(SHARED & set(item.fixturenames) for item in request.session.items):
        return
    try:
        request.getfixturevalue("slurm_sweep_started")
    except pytest.skip.Exception:
        try:
            request.getfixturevalue("study_here_started")
        except Exception:
            pass
    except Exception:
        pass


@pytest.fixture(scope="session")
def profile_sweep(tmp_path_factory):
    """ONE real launch/profile.py sweep (tests/test_profile_e2e.py's SWEEP: unsynced and SyncBN, ResNet-20, on 1
    and 2 CPU processes), shared by the profile and analysis tests: (results folder, the finished process)."""
    from tests.test_profile_e2e import _profile

    out = tmp_path_factory.mktemp("profile")
    return out, _profile(out)


@pytest.fixture(scope="session")
def float32_runs(tmp_path_factory):
    """The checker's float32 cases of tests/test_check.py: one plain-python launch (1 process) and one torchrun
    launch (2 processes), each case a check.jsonl folder under {1: ..., 2: ...}; shared with the analysis tests."""
    import json

    from tests._launch import run
    from tests.test_check import ONE, SMALL, TWO

    out = tmp_path_factory.mktemp("f32")
    for nprocs, cases in ((1, ONE), (2, TWO)):
        todo = {name: {**SMALL, **fields} for name, fields in cases.items()}
        proc = run([str(out / str(nprocs)), json.dumps(todo)], script="tests/check_worker.py", nprocs=nprocs,
                   launcher="python" if nprocs == 1 else "torchrun", check=False, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return {1: out / "1", 2: out / "2"}
