"""Explicit ghost groups and the running-statistics policies of the reference (DESIGN §2-§3).

A factorization ``n_g × n_fp × G_layer`` (and SyncBN over ``k``-rank subgroups) is a list of
explicit groups of global sample positions; the reference normalizes each on its own and records
its moments, and a buffer policy is a pure function of those records. Plain torch only: like the
reference, nothing here calls the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

Buffers = dict[str, Tensor]  # running_mean, running_var, num_batches_tracked


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no boolean equality
class GroupSpec:
    """One ghost group: global sample positions, the ranks holding them, micro-batch, layer group."""

    indices: Tensor
    ranks: tuple[int, ...]
    micro: int
    layer_group: int


def ghost_group_indices(M: int, n_g: int, n_fp: int, g_layer: int, k: int = 1) -> list[GroupSpec]:
    """The explicit ghost groups of a factorization, in the order BatchNorm meets them (DESIGN §2)."""
    for name, v in (("M", M), ("n_g", n_g), ("n_fp", n_fp), ("g_layer", g_layer), ("k", k)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer (got {v!r})")
    if n_g % k:
        raise ValueError(f"SyncBN subgroup size k={k} must divide the number of ranks n_g={n_g}")
    if M % (n_g * n_fp * g_layer):
        raise ValueError(f"M={M} is not divisible by n_g·n_fp·G_layer = {n_g}·{n_fp}·{g_layer} = {n_g * n_fp * g_layer}")
    per_rank, micro = M // n_g, M // (n_g * n_fp)
    size = micro // g_layer
    groups = []
    for first in range(0, n_g, k):  # subgroup-major (= rank-major when k == 1)
        ranks = tuple(range(first, first + k))
        for i in range(n_fp):
            for j in range(g_layer):
                # SyncBN gathers micro-batch i / group j of every rank in the subgroup: with
                # n_fp > 1 these blocks are not adjacent in the global order.
                idx = torch.cat([torch.arange(size) + r * per_rank + i * micro + j * size for r in ranks])
                groups.append(GroupSpec(idx, ranks, i, j))
    return groups


@dataclass(frozen=True, eq=False)
class GroupStat:
    """Moments one group fed to the running statistics: mean, UNBIASED variance, values per channel."""

    spec: GroupSpec
    mean: Tensor
    var: Tensor
    count: int
    step: int = 0


# --- running-statistics policies: pure functions of the recorded group moments -------------------
# A policy takes one layer's GroupStats over all steps (in the order BatchNorm met them), its buffers
# before step 0 and its momentum (None: cumulative average), and returns the buffers it ends with.
Policy = Callable[..., Buffers]


def _ema(init: Buffers, updates: Sequence[tuple[Tensor, Tensor]], momentum: float | None) -> Buffers:
    """BatchNorm's buffer update, once per (mean, unbiased var) pair."""
    if init.get("running_mean") is None:
        return {}  # track_running_stats=False: nothing to update
    rm, rv, nbt = init["running_mean"].clone(), init["running_var"].clone(), init.get("num_batches_tracked")
    n = int(nbt) if nbt is not None else 0
    for mean, var in updates:
        n += 1
        f = 1.0 / n if momentum is None else momentum  # torch: momentum None -> 1/num_batches_tracked
        rm = (1 - f) * rm + f * mean.to(rm.dtype)
        rv = (1 - f) * rv + f * var.to(rv.dtype)
    out = {"running_mean": rm, "running_var": rv}
    if nbt is not None:
        out["num_batches_tracked"] = torch.tensor(n, dtype=nbt.dtype)
    return out


def sequential(stats: Sequence[GroupStat], init: Buffers, momentum: float | None) -> Buffers:
    """One EMA update per group, in order: BatchNorm under accumulation; GhostBatchNorm "sequential"."""
    return _ema(init, [(s.mean, s.var) for s in stats], momentum)


def mean_of_groups(stats: Sequence[GroupStat], init: Buffers, momentum: float | None, per: str = "forward") -> Buffers:
    """One update per forward (per="forward") or step ("step") from the mean of group means and of
    group unbiased variances: GhostBatchNorm "mean". With n_fp = 1 the two coincide."""
    if per not in ("forward", "step"):
        raise ValueError(f"per must be 'forward' or 'step' (got {per!r})")
    buckets: dict[tuple, list[GroupStat]] = {}
    for s in stats:
        buckets.setdefault((s.step, s.spec.micro) if per == "forward" else (s.step,), []).append(s)
    return _ema(init, [(torch.stack([s.mean for s in b]).mean(0), torch.stack([s.var for s in b]).mean(0))
                       for b in buckets.values()], momentum)


def _own(stats: Sequence[GroupStat], rank: int) -> list[GroupStat]:
    return [s for s in stats if rank in s.spec.ranks]


def per_rank(stats: Sequence[GroupStat], init: Buffers, momentum: float | None, rank: int,
             policy: Policy = sequential) -> Buffers:
    """Rank `rank`'s buffers when ranks never sync them (DeepSpeed; DDP broadcast_buffers=False)."""
    return policy(_own(stats, rank), init, momentum)


def ddp_broadcast(stats: Sequence[GroupStat], init: Buffers, momentum: float | None, rank: int = 0,
                  policy: Policy = sequential, every_forward: bool = False) -> Buffers:
    """Rank `rank`'s buffers under DDP broadcast_buffers=True.

    Rank 0 holds the policy over rank 0's groups only (being overwritten by itself changes nothing),
    however often the broadcast happens. Another rank holds rank 0's buffers as of the last
    broadcast, then its own updates since. torch 2.13 broadcasts before a forward only if the
    previous forward was a synced one (``require_forward_param_sync``), so with accumulation under
    ``no_sync`` it broadcasts once per step, before micro-batch 0 (the default here);
    ``every_forward=True`` models a broadcast before every micro-batch. With n_fp = 1 both agree.
    """
    src = _own(stats, 0)
    own = _own(stats, rank)
    if rank == 0 or not own:
        return policy(src, init, momentum)
    key = lambda s: (s.step, s.spec.micro)  # noqa: E731 -- the forward a group belongs to
    cut = key(own[-1]) if every_forward else (own[-1].step, 0)
    base = policy([s for s in src if key(s) < cut], init, momentum)
    return policy([s for s in own if key(s) >= cut], base, momentum)


def allreduce_mean(stats: Sequence[GroupStat], init: Buffers, momentum: float | None,
                   policy: Policy = sequential) -> Buffers:
    """Mean over ranks of every rank's buffers after each step (ghostsys --buffer-sync allreduce).

    Equals ``mean_of_groups`` over all groups when each rank's policy is the mean policy (the EMA is
    affine in the moments); it does NOT equal ``sequential`` over all groups in general.
    """
    ranks = sorted({r for s in stats for r in s.spec.ranks})
    cur = init
    for t in sorted({s.step for s in stats}):
        bufs = [policy(_own([s for s in stats if s.step == t], r), cur, momentum) for r in ranks]
        cur = {}
        for name in bufs[0]:
            vals = torch.stack([b[name] for b in bufs])
            if vals.is_floating_point():
                cur[name] = vals.mean(0)
            elif bool((vals == vals[0]).all()):  # counters are not averaged; ranks must agree
                cur[name] = vals[0]
            else:
                raise ValueError(f"ranks disagree on {name}: {vals.tolist()}")
    return cur
