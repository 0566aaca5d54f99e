"""The collectives' share of step time, by caller, from the events of a ``torch.profiler`` trace.

What a trace shows (measured on torch 2.13):

- gloo (CPU): the caller's thread records the launch op (``c10d::allreduce_``, ``c10d::broadcast_``, ...)
  inside whatever ranges were open; the collective itself runs on a gloo worker thread as
  ``gloo:all_reduce``, ``gloo:broadcast``, ... with no parent. Each worker event is paired with its
  launch: the earliest unpaired launch of the same kind that started before it (a process group's
  work queue runs in launch order).
- NCCL (CUDA): the collective is a GPU kernel named ``nccl*``, linked to its launching CPU op by the
  profiler's correlation id.

A collective's caller is read from its launch op's enclosing ranges: SyncBN's statistics
(:data:`ghostsys.nn.syncbn.SYNCBN_RANGE`, or torch's ``SyncBatchNorm`` autograd nodes), the buffer sync
(:data:`ghostsys.run.dist.BUFFER_SYNC_RANGE`, and the buffer broadcast DDP issues inside its forward),
the loop's loss/accuracy reduction (:data:`ghostsys.run.train.LOSS_STATS_RANGE`); everything else is
the engine's gradient reduction (DDP's bucketed all-reduce, DeepSpeed's reduce and ZeRO gathers).

Shares: per profiled step (the ``ghostsys:step`` range), the union of collective intervals inside it,
summed over steps and divided by the summed step time; per caller the same with that caller's
intervals (callers can overlap one another, so their shares need not add up to the total). The
exposed part is collective time during which the training thread computes nothing: on CPU,
compute = the ``aten::`` ops on the thread that ran the step; on CUDA, compute = non-NCCL kernels.
"""

from __future__ import annotations

import re
import statistics
from typing import Any, Iterable, Sequence

STEP_RANGE = "ghostsys:step"
CALLERS = ("grad", "syncbn", "buffer_sync", "loss_stats")
# Range names (kept as strings: this wing may not import the loop's internals for them to stay cheap).
_SYNCBN = ("ghostsys:syncbn", "SyncBatchNorm", "SyncBNFunction")
_BUFFER_SYNC = "ghostsys:buffer_sync"
_LOSS_STATS = "ghostsys:loss_stats"
_DDP_FORWARD = "DistributedDataParallel.forward"
_NOT_COLLECTIVES = {"wait", "monitoredbarrier"}

Interval = tuple[float, float]


def _kind(name: str) -> str:
    """'c10d::allreduce_' / 'gloo:all_reduce' / 'c10d::_allgather_base_' -> 'allreduce' / 'allreduce' / 'allgatherbase'."""
    return re.sub(r"[^a-z]", "", name.rsplit(":", 1)[-1].lower())


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, non-overlapping union of intervals."""
    out: list[list[float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: Iterable[Interval]) -> float:
    """Total length of a merged interval list."""
    return sum(b - a for a, b in intervals)


def clip(intervals: Sequence[Interval], window: Interval) -> list[Interval]:
    """The parts of merged intervals inside window."""
    lo, hi = window
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def subtract(intervals: Sequence[Interval], minus: Sequence[Interval]) -> list[Interval]:
    """Merged intervals minus merged intervals."""
    out: list[Interval] = []
    j = 0
    for a, b in intervals:
        cur = a
        while j < len(minus) and minus[j][1] <= cur:
            j += 1
        k = j
        while k < len(minus) and minus[k][0] < b:
            if minus[k][0] > cur:
                out.append((cur, minus[k][0]))
            cur = max(cur, minus[k][1])
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


def _ancestors(ev: Any) -> list[str]:
    names = []
    p = ev
    while p is not None:
        names.append(p.name)
        p = p.cpu_parent
    return names


def caller(launch: Any) -> str:
    """Which caller issued a collective, from its launch op's enclosing ranges (see module doc)."""
    names = _ancestors(launch)
    if any(any(tag in n for tag in _SYNCBN) for n in names):
        return "syncbn"
    if _BUFFER_SYNC in names or (_kind(launch.name) == "broadcast" and _DDP_FORWARD in names):
        return "buffer_sync"
    if _LOSS_STATS in names:
        return "loss_stats"
    return "grad"


def _is_cuda(ev: Any) -> bool:
    return "cuda" in str(getattr(ev, "device_type", "")).lower()


def collectives(events: Sequence[Any]) -> tuple[list[tuple[Interval, str]], str]:
    """Every collective in the trace as ((start_us, end_us), caller), and the backend seen (gloo, nccl or none)."""
    launches = sorted((e for e in events if e.name.startswith("c10d::") and not _is_cuda(e)
                       and _kind(e.name) not in _NOT_COLLECTIVES), key=lambda e: e.time_range.start)
    gloo = sorted((e for e in events if e.name.startswith("gloo:")), key=lambda e: e.time_range.start)
    nccl = [e for e in events if _is_cuda(e) and "nccl" in e.name.lower()]
    out: list[tuple[Interval, str]] = []
    used: set[int] = set()
    for w in gloo:
        start, k = w.time_range.start, _kind(w.name)
        before = [i for i, e in enumerate(launches) if i not in used and e.time_range.start <= start]
        same = [i for i in before if k in _kind(launches[i].name) or _kind(launches[i].name) in k]
        pick = (same or before or [None])[0]
        if pick is not None:
            used.add(pick)
        out.append(((start, w.time_range.end), caller(launches[pick]) if pick is not None else "grad"))
    if nccl:
        by_id = {e.id: e for e in events if not _is_cuda(e)}
        for k in nccl:
            launch = by_id.get(getattr(k, "linked_correlation_id", None))
            out.append(((k.time_range.start, k.time_range.end), caller(launch) if launch is not None else "grad"))
    return out, ("nccl" if nccl else "gloo" if gloo else "none")


def analyze(events: Sequence[Any]) -> dict[str, Any]:
    """Collective share, exposed share and per-caller shares and counts over the trace's profiled steps."""
    steps = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == STEP_RANGE)
    if not steps:
        return {"collective_note": f"no '{STEP_RANGE}' range in the trace: nothing to attribute"}
    step_threads = {e.thread for e in events if e.name == STEP_RANGE}
    found, backend = collectives(events)
    if backend == "nccl":
        compute = merge((e.time_range.start, e.time_range.end) for e in events
                        if _is_cuda(e) and "nccl" not in e.name.lower() and e.time_range.elapsed_us() > 0)
    else:
        compute = merge((e.time_range.start, e.time_range.end) for e in events
                        if e.thread in step_threads and e.name.startswith("aten::") and not _is_cuda(e))
    total_step = sum(b - a for a, b in steps)
    every = merge(iv for iv, _ in found)
    row: dict[str, Any] = {
        "collective_backend": backend,
        "profiled_steps": len(steps),
        "profiled_step_time_median_s": statistics.median(b - a for a, b in steps) / 1e6,
        "collective_share": sum(length(clip(every, s)) for s in steps) / total_step,
        "exposed_collective_share": sum(length(subtract(clip(every, s), compute)) for s in steps) / total_step,
    }
    for who in CALLERS:
        mine = [iv for iv, c in found if c == who]
        row[f"collective_share_{who}"] = sum(length(clip(merge(mine), s)) for s in steps) / total_step
        row[f"collectives_per_step_{who}"] = sum(1 for a, _ in mine if any(lo <= a < hi for lo, hi in steps)) / len(steps)
    if backend == "none":
        row["collective_note"] = "no collectives in the profiled steps (one process, or nothing to reduce)"
    return row
