"""Run launch/ scripts the way users do: plain python, torchrun, accelerate launch, deepspeed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from ghostsys.run import launchers

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free localhost TCP port for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_cmd(launcher: str, nprocs: int, script: str) -> tuple[list[str], dict[str, str]]:
    """The command prefix and extra env that start `nprocs` CPU processes with the named launcher."""
    port = str(free_port())
    if launcher == "python":
        return [sys.executable, script], {}
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", port, script], {}
    if launcher == "accelerate":
        # `--cpu --num_processes N` starts ONE process; --multi_gpu with ACCELERATE_USE_CPU starts N on CPU.
        return ([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nprocs), "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, script],
                {"ACCELERATE_USE_CPU": "1"})
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", port, script], {}
    raise ValueError(launcher)


def run(args: list[str], *, launcher: str = "python", nprocs: int = 1, script: str = "launch/run.py",
        timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run a launch script under a launcher; raise with its output if it fails and check is set."""
    for attempt in range(2):
        cmd, extra = launcher_cmd(launcher, nprocs, str(ROOT / script))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
        proc = subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or launcher == "python" or not launchers.port_clash(proc.stdout + proc.stderr):
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + list(args))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    """The metrics.jsonl lines of a run directory."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(run_dir: Path) -> dict:
    """The summary.json of a run directory."""
    return json.loads((Path(run_dir) / "summary.json").read_text())
