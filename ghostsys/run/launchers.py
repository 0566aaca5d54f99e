"""The real launchers as subprocess commands: torchrun, accelerate launch, deepspeed (or plain python).

Shared by the sweep tables (``ghostsys.study.sweep``) and the profiler's device-count sweeps
(``ghostsys.profile.sweep``): both start a script on N local processes exactly the way a user would.
ghostsys never invents a launcher (DESIGN §1); this only spells the users' commands.
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

LAUNCHERS = ("python", "torchrun", "accelerate", "deepspeed")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # accelerate launch's --mixed_precision choices ghostsys uses

# A rendezvous port picked free can be taken by another launch before the launcher binds it: only
# these failures are worth one retry on a fresh port (a real bug fails twice).
PORT_CLASH = ("Address already in use", "EADDRINUSE", "DistNetworkError", "address in use")


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name  # the launcher installed beside this interpreter (the venv's)
    return str(here) if here.exists() else (shutil.which(name) or name)


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_clash(log: str) -> bool:
    """True when a launch failed because its rendezvous port was taken."""
    return any(p in log for p in PORT_CLASH)


def launcher_command(launcher: str, nprocs: int, script: str, *, port: int | None = None,
                     cpu: bool | None = None, mixed_precision: str = "no") -> tuple[list[str], dict[str, str]]:
    """The command prefix and extra environment that start `nprocs` processes of `script` on this node.

    On CPU, `accelerate launch --cpu --num_processes N` starts ONE process, so CPU runs use
    `--multi_gpu` with ACCELERATE_USE_CPU=1. `port` is the rendezvous port (None: the launcher's default).
    `mixed_precision` is what `accelerate launch` is told (it exports it to the script, which refuses a
    launcher setting that contradicts its own --mixed-precision); other launchers have no such setting.
    Raises ValueError naming the fix for an unknown launcher or one process too many for `python`.
    """
    if cpu is None and launcher == "accelerate":  # only accelerate launch is told; torch is a slow import
        import torch

        cpu = not torch.cuda.is_available()
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed precision {mixed_precision!r} is unknown; choose one of {', '.join(MIXED_PRECISIONS)}")
    nprocs = int(nprocs)
    if launcher == "python":
        if nprocs != 1:
            raise ValueError("launcher python starts one process; use torchrun, accelerate or deepspeed for more")
        return [sys.executable, script], {}
    if launcher == "torchrun":
        cmd = [_bin("torchrun"), "--nproc_per_node", str(nprocs)]
        return cmd + (["--master_port", str(port)] if port else []) + [script], {}
    if launcher == "accelerate":
        cmd = [_bin("accelerate"), "launch", "--num_processes", str(nprocs), "--num_machines", "1",
               "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
        if nprocs > 1:
            cmd.append("--multi_gpu")
        elif cpu:
            cmd.append("--cpu")
        cmd += ["--main_process_port", str(port)] if port else []
        return cmd + [script], ({"ACCELERATE_USE_CPU": "1"} if cpu else {})
    if launcher == "deepspeed":
        cmd = [_bin("deepspeed"), "--num_gpus", str(nprocs)]
        return cmd + (["--master_port", str(port)] if port else []) + [script], {}
    raise ValueError(f"launcher {launcher!r} is unknown; choose one of {', '.join(LAUNCHERS)}")
