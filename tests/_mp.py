"""Run a function on N real gloo ranks (fresh processes, CPU) and collect what each returns.

Usage::

    def _worker(rank: int, world_size: int, n: int) -> Tensor:  # module level: ranks import it by name
        ...                                                     # ghostsys.run.dist.init() already ran
    results = run_ranks(_worker, 2, 10)                         # [rank 0's value, rank 1's value]

Arguments and return values travel by pickle (tensors, dicts, lists; not process groups).

An exception on any rank fails the call with that rank's traceback; a rank that exits non-zero
fails it too; ranks still running after ``timeout_s`` are terminated and TimeoutError is raised,
so a deadlocked collective fails the test instead of hanging the suite. A rank that leaves with
``os._exit(0)`` (simulating a dead peer) counts as done and returns None.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    outdir: str,
    init: bool,
    collective_timeout_s: float,
    env: dict[str, str],
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        **env,
    )
    # N ranks share a couple of cores: intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
    from ghostsys.run import dist as gdist

    if init:
        gdist.init(timeout_s=collective_timeout_s, device="cpu")
    try:
        result = fn(rank, world_size, *args)
    finally:
        if init:
            gdist.shutdown()  # exiting with a live gloo group aborts some successful runs
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))


def _use_forkserver() -> None:
    # forkserver: one fresh process imports torch once (seconds on a small CPU box) and every rank
    # of every later call forks from it. Plain fork is unsafe after the test process has used
    # OpenMP; spawn would pay the torch import again for every rank.
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "ghostsys.run.dist", "ghostsys.nn.syncbn"])


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    init: bool = True,
    collective_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    With ``init=True`` each rank calls ``ghostsys.run.dist.init(collective_timeout_s, device="cpu")``
    before ``fn`` and ``shutdown()`` after; with ``init=False`` only the launcher env vars
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, plus ``env``) are set.
    """
    with tempfile.TemporaryDirectory(prefix="ghostsys-mp-") as outdir:
        _use_forkserver()
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), outdir, init, collective_timeout_s, dict(env or {}), args),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout_s
        # join() raises ProcessRaisedException / ProcessExitedException for a failed rank and
        # terminates the other ranks itself.
        while not ctx.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                for p in ctx.processes:  # only the processes this call started
                    if p.is_alive():
                        p.terminate()
                for p in ctx.processes:
                    p.join(5)
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"ranks {alive} of {world_size} still running after {timeout_s} s")
        results = []
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
        return results
