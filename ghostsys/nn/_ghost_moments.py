"""Ghost batch norm from the moments of all groups at once (private; see ``_ghost_kernels`` for
when each runs and the measurements behind that).

Both kernels compute every group's statistics with a fixed number of whole-tensor ATen calls
(no per-group calls) and use the closed-form backward of batch norm from per-(group, channel) sums:
with n values per (group, channel), xhat = (x - mean) * invstd, a = weight * invstd,

    dx = a * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n),
    dweight = sum over groups of sum(dy * xhat),   dbias = sum over groups of sum(dy).

* ``RowsGhostBN``, NCHW-like input (contiguous, at least 2 values per (sample, channel) row): in
  (M, C, S) memory a (group, channel) is m rows of S contiguous values. ATen's group-norm kernel
  with one group per row gives every row's mean and variance in one stable vectorized pass; the
  law of total variance pools them per (group, channel). The normalization y = x * scale + shift
  (as BatchNorm's own forward computes it) is ONE pass of the native eval-mode batch-norm kernel
  over the (1, M*C, S) view, whose per-"channel" affine is then a per-row one (weight = scale, bias =
  shift, running mean 0, running var 1, eps 0); in-cache tensors take a multiply and an in-place add
  instead (``_rows_affine``). Backward: ATen's group-norm backward over the same view, told each
  row's group mean and an rstd of 1, returns per row sum(dy * (x - mean)) and sum(dy) in one pass
  (it forms them as sum(dy * x) - mean * sum(dy), as GroupNorm's own backward does); dx = a*dy + k
  by the same affine pass, then one in-place addcmul adds b*x.
* ``ColsGhostBN``, (M, C) and channels_last input: its memory is (M, *S, C), so the (G, m*S, C) view
  is free and every reduction is over dim 1 with channels contiguous (vectorized along C):
  mean, the centred copy xc (saved for backward instead of x), sum(xc*xc), one addcmul; backward
  sum(dy), sum(dy*xc), addcmul, addcmul_.

Both are first-order only (``once_differentiable``), CPU or CUDA alike in principle, and handle
any running-statistics plan from per-group moments (``apply_plan``; ``Sequential`` therefore equals
BatchNorm over the chunks up to rounding, not bit for bit).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ghostsys.nn._ghost_common import Stats, apply_plan, like, row_moments, spatial

__all__ = ["RowsGhostBN", "ColsGhostBN", "cols_view"]

_aten = torch.ops.aten
# Row-moment scratch per group-norm call. One call over the whole tensor measured as fast as
# chunks of 4-16 MiB (1 MiB chunks were up to 1.5x slower on 80 MB inputs); chunks bound the scratch.
_ROWS_CHUNK_BYTES = 16 << 20
_SMALL_AFFINE_BYTES = 4 << 20  # up to here the affine pass is mul + add_ (see _rows_affine)


def _unbiased(n: int) -> float:
    return n / (n - 1) if n > 1 else float("nan")  # BatchNorm's running variance is unbiased


def _per_row(t: Tensor, m: int) -> Tensor:
    """A (G, C) per-(group, channel) tensor as one value per row of the (M*C, S) view, contiguous."""
    return t.unsqueeze(1).expand(t.shape[0], m, t.shape[1]).reshape(-1)


def _rows_affine(rows: Tensor, scale: Tensor, shift: Tensor, m: int, out: Tensor) -> Tensor:
    """out = rows * scale + shift, per (group, channel), for (1, M*C, S) views of contiguous tensors.

    Large tensors: ONE pass of the native eval-mode batch-norm kernel, whose per-"channel" affine
    is per row here. Small ones (in cache): a multiply and an in-place add, each vectorized with one
    broadcast operand (a single addcmul with two broadcast operands runs ATen's scalar loop, 3-4x
    slower), which beat the eval kernel's setup (measured: 0.08 vs 0.11 ms at 2 MiB, 0.49 vs 0.39 ms
    at 8 MiB).
    """
    r, s = rows.shape[1:]
    if rows.numel() * rows.element_size() <= _SMALL_AFFINE_BYTES:
        g, c = scale.shape
        view = (g, m, c, s)
        torch.mul(rows.view(view), scale.view(g, 1, c, 1), out=out.view(view)).add_(shift.view(g, 1, c, 1))
        return out
    zeros, ones = rows.new_zeros(r), rows.new_ones(r)  # contiguous: expanded buffers take a slow path
    unused = rows.new_empty(0)
    torch.native_batch_norm(rows, _per_row(scale, m), _per_row(shift, m), zeros, ones, False, 0.0, 0.0,
                            out=(out, unused, unused.clone()))
    return out


class RowsGhostBN(torch.autograd.Function):
    """Ghost batch norm of a contiguous (M, C, *S) input from per-(sample, channel) row moments."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                stats: Stats) -> Tensor:
        big_m, c = x.shape[:2]
        m, s = big_m // groups, spatial(x)
        rows = x.view(1, big_m * c, s)
        mu, var = (t.view(groups, m, c) for t in row_moments(rows.view(big_m * c, s), _ROWS_CHUNK_BYTES))
        mean = mu.mean(1)
        # Law of total variance over the group's m equal-sized rows (biased, as the normalization uses).
        var = var.mean(1).add_((mu - mean.unsqueeze(1)).square_().mean(1))
        invstd = (var + eps).rsqrt_()
        scale = invstd if weight is None else invstd * weight
        shift = (mean * scale).neg_() if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        # Written through a view into a tensor of x's shape: the output must not be a view itself
        # (autograd refuses in-place ops, e.g. ReLU(inplace=True), on a view made inside a Function).
        y = torch.empty_like(x)
        _rows_affine(rows, scale, shift, m, out=y.view(rows.shape))
        apply_plan(stats, mean, var.mul_(_unbiased(m * s)))
        ctx.groups = groups
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        groups = ctx.groups
        big_m, c = x.shape[:2]
        m, s = big_m // groups, spatial(x)
        r, n = big_m * c, m * s
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy_rows, x_rows = like(dy, x).view(1, r, s), x.view(1, r, s)
        ones = x.new_ones(r)  # rstd 1 (and a gamma, which the kernel needs to return dgamma at all)
        _, dots, sums = _aten.native_group_norm_backward(dy_rows, x_rows, _per_row(mean, m).view(1, r),
                                                         ones.view(1, r), ones, 1, r, s, r, [False, True, True])
        gw = dots.view(groups, m, c).sum(1)  # sum(dy * (x - mean)) per (group, channel)
        gb = sums.view(groups, m, c).sum(1)  # sum(dy)
        dx = None
        if need_x:
            a = invstd if weight is None else invstd * weight
            b = a * invstd * invstd * gw * (-1.0 / n)
            k = a * gb * (-1.0 / n) - b * mean
            dx = torch.empty_like(x)
            _rows_affine(dy_rows, a, k, m, out=dx.view(dy_rows.shape))  # a*dy + k
            dx.view(groups, m, c, s).addcmul_(x.view(groups, m, c, s), b.view(groups, 1, c, 1))
        grad_w = (gw * invstd).sum(0) if need_w and weight is not None else None
        grad_b = gb.sum(0) if need_b else None
        return dx, grad_w, grad_b, None, None, None


def cols_view(t: Tensor, groups: int) -> Tensor:
    """The free (G, m*S, C) view of a dense (M, C) or channels_last (M, C, *S) tensor."""
    if t.dim() == 2:
        return t.view(groups, -1, t.shape[1])
    return t.permute(0, *range(2, t.dim()), 1).view(groups, -1, t.shape[1])


class ColsGhostBN(torch.autograd.Function):
    """Ghost batch norm of a (M, C) or channels_last input from column sums of its (G, m*S, C) view."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                stats: Stats) -> Tensor:
        xv = cols_view(x, groups)
        n = xv.shape[1]
        mean = xv.sum(1).div_(n)
        xc = xv - mean.unsqueeze(1)
        var = torch.linalg.vecdot(xc, xc, dim=1).div_(n)  # biased, from the centred values
        invstd = (var + eps).rsqrt_()
        scale = (invstd if weight is None else invstd * weight).unsqueeze(1)
        fmt = _dense_format(x)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)  # not a view: see RowsGhostBN
        if bias is None:
            torch.mul(xc, scale, out=cols_view(y, groups))
        else:
            torch.addcmul(bias, xc, scale, out=cols_view(y, groups))
        apply_plan(stats, mean, var.mul_(_unbiased(n)))
        ctx.groups, ctx.shape, ctx.fmt = groups, x.shape, fmt
        ctx.save_for_backward(xc, weight, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        xc, weight, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dyv = cols_view(dy.contiguous(memory_format=ctx.fmt), ctx.groups)
        n = xc.shape[1]
        gb = dyv.sum(1)  # sum(dy) per (group, channel)
        gw = torch.linalg.vecdot(dyv, xc, dim=1)  # sum(dy * (x - mean))
        dx = None
        if need_x:
            a = invstd if weight is None else invstd * weight
            b = a * invstd * invstd * gw * (-1.0 / n)
            dx = torch.empty(ctx.shape, dtype=xc.dtype, device=xc.device, memory_format=ctx.fmt)
            dxv = cols_view(dx, ctx.groups)
            torch.addcmul((a * gb).mul_(-1.0 / n).unsqueeze(1), dyv, a.unsqueeze(1), out=dxv)
            dxv.addcmul_(xc, b.unsqueeze(1))
        grad_w = (gw * invstd).sum(0) if need_w and weight is not None else None
        grad_b = gb.sum(0) if need_b else None
        return dx, grad_w, grad_b, None, None, None


def _dense_format(x: Tensor) -> torch.memory_format:
    """The layout cols_view reads x in: channels_last(_3d) for images, else plain contiguous."""
    if x.dim() == 4 and spatial(x) > 1:
        return torch.channels_last
    if x.dim() == 5 and spatial(x) > 1:
        return torch.channels_last_3d
    return torch.contiguous_format
