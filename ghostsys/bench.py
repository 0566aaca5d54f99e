"""Forward+backward timing of the norm layers against BatchNorm: ``python -m ghostsys.bench``.

Not a test: it measures. Each variant runs in blocks (warm-up reps, then timed reps), the blocks of
all variants alternating over several rounds so that slow drift of a shared machine hits all of
them alike; warm-up reps are excluded. Each row reports the median and the p10/p90 spread in ms,
and the ratio of medians to the baseline at the same thread count (``nn.BatchNorm2d``; for
SeqNorm, ``F.group_norm`` followed by ``nn.BatchNorm2d``).
Gradients are reset to None between reps (outside the timed region) so that no rep pays for
accumulating into ``.grad``. On CUDA the device is synchronized around every timed rep.

On a VM, page faults on the fresh 32 MB output and gradient buffers can cost as much as the
normalization itself, and whether a buffer is fresh depends on the C allocator's history rather
than on the variant: ``--steady-alloc`` keeps freed memory in the process so the table compares
the kernels (report both). ``--clock thread`` (one thread only) ignores time spent descheduled.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ghostsys.nn.norms import GhostBatchNorm, SeqNorm

__all__ = ["benchmark", "format_rows", "machine_info", "steady_allocator", "figure2_ghost_norm",
           "chunk_loop_batch_norm", "main"]


def figure2_ghost_norm(x: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """The papers' Figure 2 / A1 GhostNorm function, generalized to any rank (no affine)."""
    m, c = x.shape[:2]
    xg = x.reshape(groups, -1, c, x[0, 0].numel())
    mean = xg.mean([1, 3], keepdim=True)
    var = xg.var([1, 3], unbiased=False, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)


def chunk_loop_batch_norm(x: Tensor, groups: int, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """Ghost norm the obvious way: BatchNorm on each chunk, then torch.cat (a running-stat update per chunk)."""
    return torch.cat([F.batch_norm(c, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
                      for c in x.chunk(groups)])


def steady_allocator() -> bool:
    """Make glibc keep freed memory (no mmap for large blocks, no trimming); True if it took effect.

    On a VM a fresh 32 MB buffer can cost as much in page faults as the normalization itself, and
    whether a variant's buffers are fresh depends on what the allocator did before, not on the
    variant. With this, every variant reuses warm memory and the table compares kernels. It changes
    this process's allocator for good, so it is opt-in (--steady-alloc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def machine_info(device: torch.device) -> dict:
    """CPU model, core count, torch version and (on CUDA) the GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _time_blocks(cases: dict[str, Callable[[], None]], reset: Callable[[], None], reps: int, warmup: int,
                 rounds: int, device: torch.device, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Per round, each variant runs a block of warm-up then timed reps; rounds alternate the variants.

    Blocks, not rep-by-rep interleaving: a variant's own steady state (caches, and the C allocator's
    reuse of its large buffers) is what a training loop sees, and another variant's allocations in
    between would change it (e.g. glibc trims the heap and the next rep page-faults). Several rounds
    still spread slow drift of a shared machine over all variants.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in cases}
    per_round = [reps // rounds + (1 if r < reps % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for name, fn in cases.items():
            for i in range(warmup + n):
                reset()
                sync()
                t0 = clock()
                fn()
                sync()
                if i >= warmup:
                    times[name].append((clock() - t0) * 1e3)
    return times


def _quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def benchmark(shape: tuple[int, ...] = (128, 64, 32, 32), threads: tuple[int, ...] = (1, 2), reps: int = 20,
              warmup: int = 3, groups: tuple[int, ...] = (1, 4, 16, 64), seq: tuple[int, int] = (16, 8),
              device: str | torch.device = "cpu", channels_last: bool = False, seed: int = 0,
              clock: str = "wall", rounds: int = 3) -> list[dict]:
    """Time forward+backward of every variant; one dict per (threads, variant) with median/p10/p90 (ms) and ratio.

    clock="thread" times the calling thread's CPU time (user + system, so page faults count) instead
    of wall time: steadier on a shared machine, but meaningful only for CPU runs with one thread.
    """
    device = torch.device(device)
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    if clock == "thread" and (device.type != "cpu" or any(t != 1 for t in threads)):
        raise ValueError("clock='thread' measures one CPU thread: use it with device cpu and threads=(1,)")
    timer = time.perf_counter if clock == "wall" else time.thread_time
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen).to(device)
    dy = torch.randn(shape, generator=gen).to(device)
    if channels_last and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    x.requires_grad_()
    bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
    modules: list[nn.Module] = []

    def new(mod: nn.Module) -> nn.Module:
        modules.append(mod.to(device).train())
        return mod

    def fwd_bwd(f: Callable[[], Tensor]) -> Callable[[], None]:
        return lambda: f().backward(dy)

    bn = new(bn_cls(c))
    cases: dict[str, tuple[str, Callable[[], None]]] = {"BatchNorm": ("BatchNorm", fwd_bwd(lambda: bn(x)))}
    for g in groups:
        gbn = new(GhostBatchNorm(c, ghost_groups=g))
        cases[f"GhostBatchNorm G={g}"] = ("BatchNorm", fwd_bwd(lambda m=gbn: m(x)))
    for g in [g for g in groups if g > 1]:
        cbn = new(bn_cls(c))
        cases[f"chunk loop G={g}"] = ("BatchNorm", fwd_bwd(lambda g=g, m=cbn: chunk_loop_batch_norm(x, g, m)))
    affine_shape = (1, c) + (1,) * (x.dim() - 2)
    for g in [g for g in groups if g > 1]:
        fbn = new(bn_cls(c))  # only for its affine parameters, so all variants do the same work
        cases[f"Figure-2 G={g}"] = ("BatchNorm", fwd_bwd(
            lambda g=g, m=fbn: figure2_ghost_norm(x, g) * m.weight.view(affine_shape) + m.bias.view(affine_shape)))
    if seq is not None and x.dim() > 2 and c % seq[0] == 0 and shape[0] % seq[1] == 0:  # else no SeqNorm rows
        g_c, g_m = seq
        base = new(bn_cls(c))
        sn = new(SeqNorm(c, channel_groups=g_c, ghost_groups=g_m))
        cases["group_norm+BatchNorm"] = ("group_norm+BatchNorm", fwd_bwd(lambda: base(F.group_norm(x, g_c))))
        cases[f"SeqNorm G_C={g_c} G_M={g_m}"] = ("group_norm+BatchNorm", fwd_bwd(lambda: sn(x)))

    params = [p for m in modules for p in m.parameters()]

    def reset() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    info = machine_info(device)
    rows: list[dict] = []
    old_threads = torch.get_num_threads()
    filters = warnings.filters[:]
    try:
        warnings.filterwarnings("ignore", message=".*ghost batches of")  # small ghost batches are the point here
        for t in threads:
            torch.set_num_threads(t)
            times = _time_blocks({k: fn for k, (_, fn) in cases.items()}, reset, reps, warmup, rounds, device, timer)
            med = {k: statistics.median(v) for k, v in times.items()}
            for name, (baseline, _) in cases.items():
                rows.append({**info, "threads": t, "clock": clock, "shape": tuple(shape),
                             "channels_last": channels_last, "variant": name, "baseline": baseline, "reps": reps,
                             "median_ms": med[name], "p10_ms": _quantile(times[name], 0.1),
                             "p90_ms": _quantile(times[name], 0.9), "ratio": med[name] / med[baseline]})
    finally:
        torch.set_num_threads(old_threads)
        warnings.filters[:] = filters
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of benchmark rows."""
    out = [f"{'threads':>7}  {'variant':<28} {'median ms':>10} {'p10':>8} {'p90':>8}  {'ratio':>6}  vs"]
    for r in rows:
        out.append(f"{r['threads']:>7}  {r['variant']:<28} {r['median_ms']:>10.2f} {r['p10_ms']:>8.2f} "
                   f"{r['p90_ms']:>8.2f}  {r['ratio']:>6.2f}  {r['baseline']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: parse, benchmark, print the machine and the table."""
    p = argparse.ArgumentParser(prog="python -m ghostsys.bench", description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--reps", type=int, default=20, help="timed reps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed reps before each block (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="blocks per variant, alternating variants (default 3)")
    p.add_argument("--shape", default="128,64,32,32", help="input shape M,C,... (default 128,64,32,32)")
    p.add_argument("--groups", default="1,4,16,64", help="ghost groups to time (default 1,4,16,64)")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and gradient")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall time (default) or the thread's CPU time (steadier on a busy machine; --threads 1 only)")
    p.add_argument("--steady-alloc", action="store_true",
                   help="keep freed memory in the process (glibc mallopt), so page faults do not blur the table")
    p.add_argument("--quick", action="store_true", help="small shape, few reps: a smoke run")
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(","))
    reps, warmup = a.reps, a.warmup
    if a.quick:
        shape, reps, warmup, a.rounds = (64, 16, 8, 8), 3, 1, 1
    groups = tuple(int(g) for g in a.groups.split(","))
    steady = steady_allocator() if a.steady_alloc else False
    if a.steady_alloc and not steady:
        print("note: --steady-alloc had no effect (not glibc?)")
    if a.quick:
        groups = tuple(g for g in groups if shape[0] % g == 0)
    rows = benchmark(shape, tuple(int(t) for t in a.threads.split(",")), reps, warmup, groups,
                     device=a.device, channels_last=a.channels_last, clock=a.clock, rounds=max(1, min(a.rounds, reps)))
    info = machine_info(torch.device(a.device))
    print(f"machine: {info['cpu']} ({info['cores']} cores){', ' + info['gpu'] if 'gpu' in info else ''}; "
          f"torch {info['torch']}; device {info['device']}")
    print(f"shape {shape}, fp32, forward+backward, {reps} reps after {warmup} warm-up, {a.clock} clock, "
          f"{'channels_last' if a.channels_last else 'contiguous'}, {'steady' if steady else 'default'} allocator; "
          "ratio = median / median of 'vs'")
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
