"""Stress the end of distributed processes: tests/test_engines.py's four launches at once, N rounds.

    python benchmarks/launch_abort_stress.py --rounds 30 --out /tmp/abort-stress

On 2 cores the four launches (plain python, torchrun, accelerate launch, deepspeed; 7 processes) keep every
thread waiting for a core, which is what exposed a gloo worker thread releasing a finished collective during
Python's finalization ("terminate called without an active exception", SIGABRT, after a successful run; see
ghostsys.run.dist.exit_if_joined). Prints one line per launch and round and a count per launcher at the end;
keeps the logs of launches that failed under --out. Not a test: a race is a rate, and this measures it.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import engine_worker  # noqa: E402
from tests._launch import ROOT, launcher_cmd  # noqa: E402
from tests.test_engines import LAUNCHES  # noqa: E402

ABORT = "terminate called without an active exception"


def one_round(out: Path) -> dict[str, tuple[int, str]]:
    """Start every launch at once; wait for all; (exit code, log) per launcher."""
    procs = {}
    for name, (nprocs, engines) in LAUNCHES.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        cmd, extra = launcher_cmd(name, nprocs, engine_worker.__file__)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra,
               "TORCH_EXTENSIONS_DIR": str(out / name / "ext")}
        procs[name] = subprocess.Popen(cmd + ["--engine", *engines, "--out", str(out / name)], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    return {name: (procs[name].returncode, log) for name, log in logs.items()}


def main() -> int:
    """Parse, run the rounds, print a line per launch and the counts; exit 1 if any launch failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, required=True, help="scratch folder; failed launches' logs stay here")
    a = ap.parse_args()
    failed, aborted = collections.Counter(), collections.Counter()
    for r in range(a.rounds):
        t0 = time.perf_counter()
        for name, (rc, log) in one_round(a.out / f"round{r}").items():
            abort = ABORT in log
            failed[name] += rc != 0
            aborted[name] += abort
            if rc != 0:
                (a.out / f"round{r}" / name / "log.txt").write_text(log)
            print(f"round {r} {name}: exit {rc}{' ABORT' if abort else ''}", flush=True)
        print(f"round {r}: {time.perf_counter() - t0:.1f} s", flush=True)
    for name in LAUNCHES:
        print(f"{name}: {failed[name]} of {a.rounds} launches failed, {aborted[name]} with '{ABORT}'")
    return 1 if sum(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
