"""One short real sweep through a real Slurm, shared by the SLURM, collect, end-to-end and analysis tests.

What it submits, all at once so that Slurm's waits overlap the CPU work (2 cores in CI):

1. the sweep, through ``launch/sweep.py submit --throttle 2``: 4 rows, every one G_M = 2 -- python,
   accelerate launch, 2-process DeepSpeed, and the preemption drill: a 2-process torchrun row whose
   steps are slowed (tests/slurm_slow_steps.py; the numbers are untouched). Once the drill has logged
   2 steps its task is signalled with ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@N``
   does before a time limit); it must checkpoint, requeue only its own array task and resume;
2. slurm/multinode.sh on one node (srun + torchrun's c10d rendezvous) with the drill's flags: the
   uninterrupted reference the drill must match exactly;
3. the equivalence table (``equivalence_rows``), through the same ``submit``: the runs tests/test_run_e2e.py
   compares -- every mechanism of G_M = 4 (the layer, accumulation under plain ``accelerate launch``, unsynced
   data parallel on Accelerate and DeepSpeed), SyncBN over 2 ranks and the BatchNorm control -- so they fill
   Slurm's gaps (the drill's slowed steps, its requeue wait, one-process rows two at a time) instead of running
   one after another afterwards. It is a table of its own, with its own results folder, so the sweep's
   results (``.results``: 4 rows of G_M = 2, what the analysis notebooks read) stay as they were.

Rows are grouped by process count, so each table is two array jobs. Everything is submitted at the session's
first test (tests/conftest.py); a background thread signals the drill and waits (bounded) until Slurm has none
of the jobs; the first test that needs the results joins it and collects both tables with
``launch/sweep.py collect``.

Without Slurm (``study_sweep`` in tests/conftest.py) the equivalence table runs here instead, through
``launch/sweep.py run`` in the background (``start_here``): the same table, the same results layout, so those
tests never skip.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ghostsys.run.rundir import read_jsonl
from ghostsys.study.sweep import make_row, row_argv, write_table
from tests._slurm import ROOT, LocalSlurm

# A bound for hangs, not a speed claim: the sweep alone was ~180 CPU-s of work (cpuacct, measured on a loaded
# 2-core machine, 10 min wall there); the equivalence table's seven 20-step runs come on top, and the other
# tests run meanwhile.
WAIT_S = 1800
TINY = {"batch_size": 32, "max_steps": 3, "progress": False, "eval_every": 0}
TWO_RANKS = {"mode": "unsynced", **TINY, "max_steps": 6}  # the drill: long enough to be signalled mid-way
DRILL_SIGNAL_AFTER = 2  # steps logged before the drill's signal


def drill_row() -> dict:
    """2 torchrun ranks with slowed steps, so that the signal lands mid-run."""
    return make_row(TWO_RANKS, name="drill", launcher="torchrun", nprocs=2, script="tests/slurm_slow_steps.py")


# tests/test_run_e2e.py's runs: float64 (DeepSpeed: float32), 20 steps, M = 64 (the tolerances there say why).
EQUIVALENCE_FLAGS = {"batch_size": 64, "max_steps": 20, "dtype": "float64", "progress": False, "eval_every": 0}
F32 = {"dtype": "float32"}
UNSYNCED_2x2 = {"mode": "unsynced", "nfp": 2}  # 2 ranks x 2 passes: G_M = 4
EQUIVALENCE = {  # name in tests/test_run_e2e.py: (row name, launcher, nprocs, flags)
    "layer G4 (python, 1 proc)": ("layer-g4", "python", 1, {"mode": "layer", "ghost_groups": 4}),
    # the users' one-process command: plain `accelerate launch --cpu --num_processes 1`
    "accumulate nfp4 (accelerate launch, 1 proc)": ("accumulate-nfp4", "accelerate", 1,
                                                    {"mode": "accumulate", "nfp": 4}),
    "unsynced 2 x nfp2 (accelerate launch, 2 procs)": ("unsynced-2x2", "accelerate", 2, UNSYNCED_2x2),
    # DeepSpeed trains float32 only: it is compared with the float32 layer run below.
    "f32 unsynced 2 x nfp2 deepspeed (deepspeed, 2 procs)": ("deepspeed-2x2-f32", "deepspeed", 2,
                                                             {**UNSYNCED_2x2, "engine": "deepspeed", "zero_stage": 1,
                                                              **F32}),
    "f32 layer G4 (python, 1 proc)": ("layer-g4-f32", "python", 1, {"mode": "layer", "ghost_groups": 4, **F32}),
    # SyncBN over both ranks is full BatchNorm (G_M = 1): it must equal the one-process control. (SyncBN
    # with n_fp > 1 merges micro-batch i of each rank, a non-contiguous partition: the checker covers it.)
    "syncbn k2 (torchrun, 2 procs)": ("syncbn-k2", "torchrun", 2, {"mode": "syncbn"}),
    "control: BatchNorm G_M=1": ("control-gm1", "python", 1, {"mode": "accumulate", "nfp": 1}),
}


def equivalence_rows() -> dict[str, dict]:
    """The equivalence table's rows by name (row ids are stable: derived from launcher, processes and flags)."""
    return {name: make_row({**EQUIVALENCE_FLAGS, **flags}, name=row, launcher=launcher, nprocs=nprocs)
            for name, (row, launcher, nprocs, flags) in EQUIVALENCE.items()}


def sweep_rows() -> list[dict]:
    """The sweep: 4 short rows through all four launchers, two of 2 processes, one DeepSpeed; all G_M = 2."""
    return [
        make_row({"mode": "layer", "ghost_groups": 2, **TINY}, name="layer-g2"),
        make_row({"mode": "accumulate", "nfp": 2, **TINY}, name="accumulate-nfp2", launcher="accelerate"),
        drill_row(),
        make_row({"mode": "unsynced", "engine": "deepspeed", "zero_stage": 1, **TINY}, name="deepspeed-2",
                 launcher="deepspeed", nprocs=2),
    ]


@dataclass
class StudySweep:
    """A table that ran (through Slurm or here) and what collect said: rows by name, results folder, how."""

    table: Path
    results: Path
    rows: dict[str, dict]
    via: str  # "slurm" or "local"
    collect_rc: int = -1
    collect_out: str = ""

    @property
    def csv(self) -> Path:
        """The collected table (one row per table row)."""
        return self.results / "results.csv"

    def run_dir(self, name: str) -> Path:
        """The results directory of the row called `name`: <results>/<row_id>."""
        return self.results / self.rows[name]["row_id"]


@dataclass
class SlurmSweep:
    """What the session's sweep left: tables, results folders, job ids, collect's exit codes and output."""

    base: Path
    table: Path
    results: Path
    multinode_out: Path
    multinode_log: Path
    jobs: dict[str, str] = field(default_factory=dict)
    collect_rc: int = -1
    collect_out: str = ""
    signalled: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    study: StudySweep | None = None  # the equivalence table, submitted with the sweep

    @property
    def csv(self) -> Path:
        """The collected table of the sweep (one row per table row)."""
        return self.results / "results.csv"

    def logs(self, tail: int = 3000) -> str:
        """Every Slurm task log's tail, for failure messages."""
        files = sorted(self.base.rglob("logs/*.out")) + [self.multinode_log]
        return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-tail:]}" for f in files if f.exists())


def sweep_cli(*argv: str) -> tuple[int, str, str]:
    """launch/sweep.py in-process: (exit code, stdout, stderr)."""
    from launch.sweep import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _study(base: Path, via: str) -> StudySweep:
    rows = equivalence_rows()
    return StudySweep(table=write_table(rows.values(), base / "equivalence.csv"), results=base / "equivalence",
                      rows=rows, via=via)


def _collect(study: StudySweep) -> StudySweep:
    study.collect_rc, out, err = sweep_cli("collect", str(study.table), "--results", str(study.results))
    study.collect_out = out + err
    return study


class Started:
    """Work started in the background at the session's first test (tests/conftest.py); `result()` waits for it
    and returns what `finish` makes of it, or raises what went wrong; `stop()` ends what is still running."""

    def __init__(self, wait: Callable[[threading.Event], None], finish: Callable[[], Any],
                 stop: Callable[[], None] = lambda: None) -> None:
        self._finish, self._stop_work, self._error = finish, stop, None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._wait, args=(wait,), name="shared-sweep", daemon=True)
        self._thread.start()

    def _wait(self, wait: Callable[[threading.Event], None]) -> None:
        try:
            wait(self._stopping)
        except BaseException as err:  # raised again by result(), in the test that needs the sweep
            self._error = err

    def result(self) -> Any:
        """Wait (bounded by the work's own deadline), then finish in the calling thread."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._finish()

    def stop(self) -> None:
        """At the session's end: stop waiting, end what is still running (by its own ids, never by name)."""
        self._stopping.set()
        self._stop_work()
        self._thread.join(timeout=30)


def start_here(base: Path) -> Started:
    """Without Slurm: the equivalence table through `launch/sweep.py run` (a subprocess, row after row, in the
    background); `result()` collects it."""
    study = _study(base, "local")
    log = base / "sweep-run.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "sweep.py"), "run", str(study.table), "--results",
                                 str(study.results), "--no-progress"], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)

    def wait(stopping: threading.Event) -> None:
        deadline = time.monotonic() + WAIT_S
        while proc.poll() is None:
            if stopping.is_set():
                raise AssertionError("launch/sweep.py run was stopped at the session's end before it finished")
            if time.monotonic() > deadline:
                raise AssertionError(f"launch/sweep.py run did not finish in {WAIT_S} s:\n{log.read_text()[-6000:]}")
            time.sleep(0.5)
        if proc.returncode != 0:
            raise AssertionError(f"launch/sweep.py run exited {proc.returncode}:\n{log.read_text()[-6000:]}")

    def stop() -> None:
        if proc.poll() is None:  # the runner and everything below it (torchrun's ranks have sessions of their own)
            import psutil

            tree = [psutil.Process(proc.pid)]
            tree += tree[0].children(recursive=True)
            for p in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(tree, timeout=30)

    return Started(wait, lambda: _collect(study), stop)


def start_sweep(cluster: LocalSlurm, base: Path) -> Started:
    """Submit the sweep, the equivalence table and the multi-node run now; in the background, signal the drill
    mid-run and wait until Slurm has none of the jobs; `result()` collects (a SlurmSweep)."""
    t0 = time.monotonic()
    sw = SlurmSweep(base=base, table=write_table(sweep_rows(), base / "sweep.csv"), results=base / "sweep",
                    multinode_out=base / "multinode" / "run", multinode_log=base / "multinode" / "slurm.out",
                    study=_study(base, "slurm"))
    # The jobs inherit the environment at submission (--export=ALL): set what they need only for that moment.
    with _environ(OMP_NUM_THREADS="1"):
        for key, table, results in (("sweep", sw.table, sw.results),
                                    ("equivalence", sw.study.table, sw.study.results)):
            rc, out, err = sweep_cli("submit", str(table), "--results", str(results), "--throttle", "2",
                                     "--max-requeues", "2")
            assert rc == 0, out + err
            sw.jobs[key] = out.strip()  # the array job ids, comma-separated: all that submit prints on stdout
    sw.multinode_log.parent.mkdir(parents=True)
    with _environ(OMP_NUM_THREADS="1", GHOSTSYS_PROCS_PER_NODE="2", GHOSTSYS_ROOT=str(ROOT),
                  GHOSTSYS_PYTHON_BIN=str(Path(sys.executable).parent)):
        sw.jobs["multinode"] = cluster.run(
            "sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", f"--output={sw.multinode_log}",
            f"--chdir={ROOT}", str(ROOT / "slurm" / "multinode.sh"), "torchrun", "launch/run.py",
            *row_argv(TWO_RANKS), "--out", str(sw.multinode_out)).stdout.strip()
    drill_dir = sw.results / drill_row()["row_id"]

    def wait(stopping: threading.Event) -> None:
        deadline = time.monotonic() + WAIT_S
        while not stopping.is_set():
            queued = cluster.queued()
            if not any(j in queued for jobs in sw.jobs.values() for j in jobs.split(",")):
                return
            if not sw.signalled and len(read_jsonl(drill_dir / "metrics.jsonl")) >= DRILL_SIGNAL_AFTER:
                starts = [a for a in read_jsonl(drill_dir / "attempts.jsonl") if a.get("event") == "start"]
                sw.signalled = {"job": starts[-1]["slurm_job_id"], "after_steps": str(DRILL_SIGNAL_AFTER)}
                cluster.run("scancel", "--signal=USR1", "--batch", sw.signalled["job"])  # the batch shell only
            if time.monotonic() > deadline:
                raise AssertionError(f"the Slurm sweep did not finish in {WAIT_S} s (still queued: {sorted(queued)})"
                                     f"\n{sw.logs()}\n{cluster.logs()}")
            time.sleep(0.25)

    def finish() -> SlurmSweep:
        sw.collect_rc, out, err = sweep_cli("collect", str(sw.table), "--results", str(sw.results))
        sw.collect_out = out + err
        _collect(sw.study)
        sw.wall_s = time.monotonic() - t0  # from submission to collection, whatever ran meanwhile
        return sw

    return Started(wait, finish)  # at the session's end slurm_cluster cancels whatever is left
