"""What every ghost batch-norm kernel shares (private): running-statistics plans and layout helpers.

A kernel gets the running-statistics work as a *plan* and carries it out the way its own arithmetic
allows; ``apply_plan`` is the one place that turns per-group moments into buffer updates for the
kernels that have them as tensors (the native per-group loop instead hands the real buffers to
ATen's kernel, which is what makes its ``Sequential`` updates bit-identical to BatchNorm's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["Sequential", "Collect", "Average", "Stats", "apply_plan", "as_sequential", "memory_format_of", "like",
           "row_moments", "spatial"]

_aten = torch.ops.aten


@dataclass
class Sequential:
    """Update the real running buffers once per group, in group order, with momenta[g]."""

    running_mean: Tensor
    running_var: Tensor
    momenta: Sequence[float]


@dataclass
class Collect:
    """Write each group's mean and UNBIASED variance into row g of two (G, C) tensors."""

    mean: Tensor
    var: Tensor


@dataclass
class Average:
    """One EMA step with `factor` toward the mean over groups of the group means and of the group
    UNBIASED variances (GhostBatchNorm's "mean" policy)."""

    running_mean: Tensor
    running_var: Tensor
    factor: float


Stats = Union[Sequential, Collect, Average, None]


def apply_plan(stats: Stats, mean: Tensor, var: Tensor) -> None:
    """Carry out a plan from per-group moments: mean and UNBIASED var, both (G, C)."""
    if stats is None:
        return
    with torch.no_grad():
        if isinstance(stats, Collect):
            stats.mean.copy_(mean)
            stats.var.copy_(var)
        elif isinstance(stats, Average):
            # The same lerp toward the same means as the policy has always used.
            stats.running_mean.lerp_(mean.mean(0).to(stats.running_mean.dtype), stats.factor)
            stats.running_var.lerp_(var.mean(0).to(stats.running_var.dtype), stats.factor)
        else:  # BatchNorm's update, once per group in order (equal to it up to rounding)
            for g, f in enumerate(stats.momenta):
                stats.running_mean.mul_(1 - f).add_(mean[g], alpha=f)
                stats.running_var.mul_(1 - f).add_(var[g], alpha=f)


def as_sequential(stats: Average, groups: int) -> Sequential:
    """The Average step as G in-order EMA updates with the group moments, for kernels whose native
    per-group calls update the buffers themselves.

    With factors f_k = (f/G) / (1 - (G-k) f/G), k = 1..G, the G updates r <- (1 - f_k) r + f_k m_k
    telescope to (1 - f) r + (f/G) sum_k m_k: each group's weight is f/G and the old value keeps
    1 - f (every denominator is >= k/G > 0 for f <= 1). Equal to the single step up to rounding.
    """
    f, g = stats.factor, groups
    momenta = [(f / g) / (1 - (g - k) * f / g) for k in range(1, g + 1)]
    return Sequential(stats.running_mean, stats.running_var, momenta)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format x is dense in (channels_last(_3d) only when not also plain contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def spatial(x: Tensor) -> int:
    """Values per (sample, channel): the product of the spatial dims (1 for (M, C)); no tensor op."""
    return math.prod(x.shape[2:])


def like(t: Tensor, ref: Tensor) -> Tensor:
    """t with exactly ref's strides: the native kernels take their fast path only when the
    gradient is laid out like the input (autograd may hand us expanded or permuted gradients)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def row_moments(rows: Tensor, chunk_bytes: int) -> tuple[Tensor, Tensor]:
    """Mean and BIASED variance of every row of a contiguous (R, L) tensor, as two (R,) tensors.

    ATen's group-norm kernel with one group per row computes them in one vectorized, numerically
    stable pass (its row moments; 2-3x faster than the layer-norm kernel's here). Its normalized
    output is scratch: rows go through in chunks of about `chunk_bytes` so that the scratch stays
    small and is reused. eps=0 makes rstd exactly 1/std (inf for a constant row, whose variance
    rstd**-2 is then exactly 0).
    """
    r_total, length = rows.shape
    step = max(1, chunk_bytes // max(1, length * rows.element_size()))
    means, rstds = [], []
    for r in rows.split(step):
        n = r.shape[0]
        _, mu, rstd = _aten.native_group_norm(r.view(1, n, length), None, None, 1, n, length, n, 0.0)
        means.append(mu.view(n))
        rstds.append(rstd.view(n))
    mean = means[0] if len(means) == 1 else torch.cat(means)
    rstd = rstds[0] if len(rstds) == 1 else torch.cat(rstds)
    return mean, rstd.pow_(-2)
