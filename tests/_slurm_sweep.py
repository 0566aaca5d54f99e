"""One short real sweep through a real Slurm, shared by the SLURM, collect and analysis tests.

What it submits, all at once so that Slurm's waits overlap the CPU work (2 cores in CI):

1. the sweep, through ``launch/sweep.py submit --throttle 2``: 4 rows, every one G_M = 2 -- python,
   accelerate launch, 2-process DeepSpeed, and the preemption drill: a 2-process torchrun row whose
   steps are slowed (tests/slurm_slow_steps.py; the numbers are untouched). Once the drill has logged
   2 steps its task is signalled with ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@N``
   does before a time limit); it must checkpoint, requeue only its own array task and resume;
2. slurm/multinode.sh on one node (srun + torchrun's c10d rendezvous) with the drill's flags: the
   uninterrupted reference the drill must match exactly.

Rows are grouped by process count, so the sweep is two array jobs. The fixture waits (bounded) until
Slurm has none of the jobs, then collects the table with ``launch/sweep.py collect``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ghostsys.run.rundir import read_jsonl
from ghostsys.study.sweep import make_row, row_argv, write_table
from tests._slurm import ROOT, LocalSlurm

WAIT_S = 900  # ~180 CPU-s of work (cpuacct, measured on a loaded 2-core machine, 10 min wall there): a bound for hangs
TINY = {"batch_size": 32, "max_steps": 3, "progress": False, "eval_every": 0}
TWO_RANKS = {"mode": "unsynced", **TINY, "max_steps": 6}  # the drill: long enough to be signalled mid-way
DRILL_SIGNAL_AFTER = 2  # steps logged before the drill's signal


def drill_row() -> dict:
    """2 torchrun ranks with slowed steps, so that the signal lands mid-run."""
    return make_row(TWO_RANKS, name="drill", launcher="torchrun", nprocs=2, script="tests/slurm_slow_steps.py")


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


def run_sweep(cluster: LocalSlurm, base: Path) -> SlurmSweep:
    """Submit the sweep and the multi-node run; signal the drill mid-run; wait; collect."""
    t0 = time.monotonic()
    sw = SlurmSweep(base=base, table=write_table(sweep_rows(), base / "sweep.csv"), results=base / "sweep",
                    multinode_out=base / "multinode" / "run", multinode_log=base / "multinode" / "slurm.out")
    # The jobs inherit the environment at submission (--export=ALL): set what they need only for that moment.
    with _environ(OMP_NUM_THREADS="1"):
        rc, out, err = sweep_cli("submit", str(sw.table), "--results", str(sw.results), "--throttle", "2",
                                 "--max-requeues", "2")
        assert rc == 0, out + err
        sw.jobs["sweep"] = out.strip()  # the array job ids, comma-separated: all that submit prints on stdout
    sw.multinode_log.parent.mkdir(parents=True)
    with _environ(OMP_NUM_THREADS="1", GHOSTSYS_PROCS_PER_NODE="2", GHOSTSYS_ROOT=str(ROOT),
                  GHOSTSYS_PYTHON_BIN=str(Path(sys.executable).parent)):
        sw.jobs["multinode"] = cluster.run(
            "sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", f"--output={sw.multinode_log}",
            f"--chdir={ROOT}", str(ROOT / "slurm" / "multinode.sh"), "torchrun", "launch/run.py",
            *row_argv(TWO_RANKS), "--out", str(sw.multinode_out)).stdout.strip()
    drill_dir = sw.results / drill_row()["row_id"]
    deadline = time.monotonic() + WAIT_S
    while True:
        queued = cluster.queued()
        if not any(j in queued for jobs in sw.jobs.values() for j in jobs.split(",")):
            break
        if not sw.signalled and len(read_jsonl(drill_dir / "metrics.jsonl")) >= DRILL_SIGNAL_AFTER:
            starts = [a for a in read_jsonl(drill_dir / "attempts.jsonl") if a.get("event") == "start"]
            sw.signalled = {"job": starts[-1]["slurm_job_id"], "after_steps": str(DRILL_SIGNAL_AFTER)}
            cluster.run("scancel", "--signal=USR1", "--batch", sw.signalled["job"])  # the batch shell only
        if time.monotonic() > deadline:
            raise AssertionError(f"the Slurm sweep did not finish in {WAIT_S} s (still queued: {sorted(queued)})\n"
                                 f"{sw.logs()}\n{cluster.logs()}")
        time.sleep(0.25)
    sw.collect_rc, out, err = sweep_cli("collect", str(sw.table), "--results", str(sw.results))
    sw.collect_out = out + err
    sw.wall_s = time.monotonic() - t0
    return sw
