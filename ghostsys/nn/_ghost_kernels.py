"""Training-mode ghost batch normalization kernels behind ``ghostsys.nn.norms`` (private).

Two interchangeable implementations of "normalize each of G contiguous blocks of the batch on its
own statistics, then apply one per-channel affine" (timings: 128x64x32x32 float32, one core of a
2-core AMD EPYC VM, allocator kept warm; see ``python -m ghostsys.bench``):

* ``loop`` (CPU): a ``torch.autograd.Function`` built on ATen's native kernels. A ghost group
  ``x[k*m:(k+1)*m]`` is a contiguous slice of the batch dimension, which is outermost in NCHW *and*
  in channels_last, so each group is itself a dense tensor of the input's layout.

  - Forward, default: the native batch-norm kernel once per group, reading the group in place and
    writing straight into the matching slice of one preallocated output (``out=``; no
    ``torch.cat``). Used for channels_last, (M, C) and small spatial sizes, and always for the
    ``Sequential`` policy, whose running buffers it updates exactly as BatchNorm over the chunks.
  - Forward, NCHW with >= 64 spatial positions: ATen's NCHW batch-norm statistics loop is scalar
    (18 ms, where channels_last takes 5 ms), so we take per-(sample, channel) moments with the
    vectorized layer-norm kernel over 1 MiB chunks of rows, pool them into per-(group, channel)
    moments (law of total variance: no cancellation) and normalize with one ``addcmul`` (~10 ms).
  - Backward: per group, the native backward computes the group's sums of dy and dy*xhat. Its
    ``out=`` variant is only a compute-then-copy wrapper, so dx cannot be written in place by it:
    for NCHW we let it write dx into a scratch tensor and copy that slice over (one fused pass
    plus a copy); for channels_last we ask only for the sums and write dx with two ``addcmul``
    passes. Each measured faster than the other on its layout.
* ``vectorized``: plain autograd ops, device-agnostic and twice differentiable: (G, m, C, *S) is
  copied to (m, G*C, *S) so that ONE ``F.batch_norm`` call (cuDNN on CUDA) normalizes every
  (group, channel) pair, and copied back. Two copies instead of G calls: the choice on CUDA, where
  the loop would pay a kernel launch per group (not benchmarked on a GPU here: none was at hand),
  and for CPU ghost groups under 4096 values, where per-call overhead dominates. A var_mean-based
  version measured 3-6x slower on CPU (Welford reductions), so this one replaced it.

Running statistics go through a small plan object so that each implementation can update them the
way the policy needs (see ``Sequential`` and ``Collect``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ghostsys.nn._ghost_common import Average, Collect, Sequential, Stats, apply_plan, like, memory_format_of, row_moments
from ghostsys.nn._ghost_moments import ColsGhostBN, RowsGhostBN

__all__ = ["Sequential", "Collect", "Average", "ghost_batch_norm", "memory_format_of", "IMPLS", "choose_impl"]

IMPLS = ("auto", "loop", "chunks", "vectorized", "rows", "cols")
_aten = torch.ops.aten
# Switches between equivalent strategies of the loop implementation (module constants so tests
# can force each path on small shapes; see the module docstring for the measurements behind them).
_ROW_MOMENTS_MIN_SPATIAL = 64  # shorter layer-norm rows do not beat the native loop (measured)
_ROW_CHUNK_BYTES = 1 << 20  # layer-norm scratch per call: about an L2 cache, reused call to call
_FUSED_BACKWARD = True  # NCHW: fused native backward into scratch + copy (else two addcmul passes)
_LOOP_MIN_GROUP_NUMEL = 4096  # "auto": smaller ghost groups go to the vectorized path (measured crossover)
_like = like


def _groups(t: Tensor, groups: int) -> tuple[Tensor, ...]:
    """The G contiguous batch blocks of t, as views (one call; cheaper than Tensor.split)."""
    return t.unflatten(0, (groups, -1)).unbind(0)


def _forward_native(x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                    stats: Stats, save_mean: Tensor, save_invstd: Tensor) -> None:
    """One native batch-norm call per group, writing into y's slice and save_*[g]."""
    if isinstance(stats, Sequential):
        rms, rvs, momenta = [stats.running_mean] * groups, [stats.running_var] * groups, stats.momenta
    elif isinstance(stats, Collect):
        # momentum 1 on a zeroed row: the kernel writes the group's own moments there.
        rms, rvs, momenta = stats.mean.unbind(0), stats.var.unbind(0), [1.0] * groups
    else:
        rms = rvs = [None] * groups
        momenta = [0.0] * groups
    # unbind makes all per-group views in one call, and torch.native_batch_norm(out=) parses its
    # arguments faster than torch.ops: per-call overhead is what counts when groups are small.
    for xg, yg, sm, si, rm, rv, mom in zip(_groups(x, groups), _groups(y, groups), save_mean.unbind(0),
                                           save_invstd.unbind(0), rms, rvs, momenta):
        torch.native_batch_norm(xg, weight, bias, rm, rv, True, mom, eps, out=(yg, sm, si))


def _forward_row_moments(x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                         eps: float, stats: Collect | None, save_mean: Tensor, save_invstd: Tensor) -> None:
    """NCHW: moments per (sample, channel) row (``row_moments``), pooled per (group, channel)."""
    m, c = x.shape[0] // groups, x.shape[1]
    hw = x[0, 0].numel()
    row_mean, row_var = (t.view(groups, m, c) for t in row_moments(x.view(-1, hw), _ROW_CHUNK_BYTES))
    mean = row_mean.mean(1)
    # Law of total variance over the group's m equal-sized rows (biased, as the normalization uses).
    var = row_var.mean(1) + (row_mean - mean.unsqueeze(1)).square().mean(1)
    save_mean.copy_(mean)
    torch.rsqrt(var + eps, out=save_invstd)
    scale = save_invstd if weight is None else save_invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    view = (groups, 1, c, 1)
    torch.addcmul(shift.view(view), x.view(groups, m, c, hw), scale.view(view), out=y.view(groups, m, c, hw))
    if stats is not None:
        n = m * hw
        stats.mean.copy_(mean)
        stats.var.copy_(var * (n / (n - 1)))


class _LoopGhostBN(torch.autograd.Function):
    """Per-group native batch norm writing into slices of one output; see module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                eps: float, stats: Stats) -> Tensor:
        y = torch.empty_like(x)  # x is dense, so this copies its strides: slices line up
        # Saved statistics stay in the parameter dtype, as the native kernel's own.
        p_dtype = weight.dtype if weight is not None else x.dtype
        save_mean = x.new_empty((groups, x.shape[1]), dtype=p_dtype)
        save_invstd = torch.empty_like(save_mean)
        nchw = x.dim() > 2 and memory_format_of(x) == torch.contiguous_format
        if nchw and x[0, 0].numel() >= _ROW_MOMENTS_MIN_SPATIAL and not isinstance(stats, Sequential):
            _forward_row_moments(x, y, weight, bias, groups, eps, stats, save_mean, save_invstd)
        else:
            _forward_native(x, y, weight, bias, groups, eps, stats, save_mean, save_invstd)
        ctx.groups, ctx.eps = groups, eps
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        groups, eps = ctx.groups, ctx.eps
        m, c = x.shape[0] // groups, x.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy = _like(dy, x)
        xs, dys = _groups(x, groups), _groups(dy, groups)
        dx = torch.empty_like(x) if need_x else None
        fused = need_x and _FUSED_BACKWARD and memory_format_of(x) == torch.contiguous_format
        gw_list, gb_list = [], []
        dxs = _groups(dx, groups) if fused else [None] * groups
        for xg, dyg, dxg, sm, si in zip(xs, dys, dxs, save_mean.unbind(0), save_invstd.unbind(0)):
            scratch, gw_g, gb_g = _aten.native_batch_norm_backward(dyg, xg, weight, None, None, sm, si, True, eps,
                                                                    [fused, True, True])
            if fused:
                dxg.copy_(scratch)
            del scratch  # free it before the next call allocates one again (same block, no page faults)
            gw_list.append(gw_g)
            gb_list.append(gb_g)
        gw, gb = torch.stack(gw_list), torch.stack(gb_list)  # (G, C): sum(dy*xhat), sum(dy)
        if need_x and not fused:
            # dx = w*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)) = a*dy + b*x + k per (group, channel);
            # the native forward uses the same x*alpha + beta form, so precision is on a par with it.
            n = m * x[0, 0].numel()
            a = save_invstd if weight is None else save_invstd * weight
            b = a * save_invstd * gw * (-1.0 / n)
            k = a * gb * (-1.0 / n) - b * save_mean
            view = (groups, 1, c) + (1,) * (x.dim() - 2)  # broadcast over (G, m, C, *S) views
            dxv = dx.unflatten(0, (groups, m))
            torch.addcmul(k.view(view), dy.unflatten(0, (groups, m)), a.view(view), out=dxv)
            dxv.addcmul_(x.unflatten(0, (groups, m)), b.view(view))
        grad_w = gw.sum(0) if need_w and weight is not None else None
        grad_b = gb.sum(0) if need_b else None
        return dx, grad_w, grad_b, None, None, None


def _vectorized(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                stats: Stats) -> Tensor:
    """One BatchNorm call whose channels are the (group, channel) pairs; plain autograd ops.

    (G, m, C, *S) is copied to (m, G*C, *S), normalized by F.batch_norm (cuDNN or the native
    kernel, twice differentiable) and copied back: two extra copies instead of G calls.
    """
    m, c, spatial = x.shape[0] // groups, x.shape[1], x.shape[2:]
    xt = x.unflatten(0, (groups, m)).transpose(0, 1).reshape(m, groups * c, *spatial)
    rm = rv = None
    momentum = 0.0
    if stats is not None:
        # momentum 1 on zeroed buffers: BatchNorm writes each (group, channel)'s mean and unbiased var.
        moments = stats if isinstance(stats, Collect) else Collect(*stats.running_mean.new_zeros((2, groups, c)))
        rm, rv, momentum = moments.mean.view(-1), moments.var.view(-1), 1.0
    w = weight.repeat(groups) if weight is not None else None
    b = bias.repeat(groups) if bias is not None else None
    yt = F.batch_norm(xt, rm, rv, w, b, True, momentum, eps)
    y = torch.empty_like(x)  # the input's memory format, filled by one copy
    y.unflatten(0, (groups, m)).copy_(yt.view(m, groups, c, *spatial).transpose(0, 1))
    if isinstance(stats, Sequential):  # BatchNorm's update, once per group in order (equal up to rounding)
        apply_plan(stats, moments.mean, moments.var)
    return y


def _chunks(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
            stats: Stats) -> Tensor:
    """F.batch_norm on each group under autograd, then one torch.cat: BatchNorm over the chunks.

    No Python in the backward (one native batch-norm backward node per group), so it has the least
    overhead per group; it pays a copy each way (cat forward, its split backward).
    """
    if isinstance(stats, Sequential):  # the real buffers, BatchNorm's own update per group: bit-identical
        plan = [(stats.running_mean, stats.running_var, f) for f in stats.momenta]
    elif isinstance(stats, Collect):  # momentum 1 on a zeroed row: the kernel writes the group's moments there
        plan = list(zip(stats.mean.unbind(0), stats.var.unbind(0), [1.0] * groups))
    else:
        plan = [(None, None, 0.0)] * groups
    return torch.cat([F.batch_norm(xg, rm, rv, weight, bias, True, f, eps)
                      for xg, (rm, rv, f) in zip(x.chunk(groups), plan)])


def choose_impl(x: Tensor, groups: int, stats: Stats) -> str:
    """The kernel "auto" runs for this input (see the module docstring for the measurements)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return "vectorized"
    if isinstance(stats, Sequential):
        return "loop"  # the only kernel whose per-group buffer updates are BatchNorm's bit for bit
    if x.dim() > 2 and x[0, 0].numel() > 1 and memory_format_of(x) == torch.contiguous_format:
        return "rows"
    return "cols"


def ghost_batch_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                     stats: Stats = None, impl: str = "auto") -> Tensor:
    """Training-mode batch norm over each of `groups` contiguous batch blocks, then the affine."""
    if impl == "auto":
        impl = choose_impl(x, groups, stats)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("loop", "chunks", "vectorized") and isinstance(stats, Average):
        # These kernels collect the group moments into (G, C) rows; the plan is applied from them.
        moments = stats.running_mean.new_zeros((2, groups, x.shape[1]))  # zeroed: see Collect
        y = ghost_batch_norm(x, groups, weight, bias, eps, Collect(moments[0], moments[1]), impl)
        apply_plan(stats, moments[0], moments[1])
        return y
    if impl == "vectorized":
        return _vectorized(x, weight, bias, groups, eps, stats)
    if impl == "chunks":
        return _chunks(x, weight, bias, groups, eps, stats)
    fmt = memory_format_of(x)
    if impl == "rows":
        if x.dim() < 3:
            raise ValueError("impl='rows' needs an (M, C, *spatial) input; use 'cols' for (M, C)")
        return RowsGhostBN.apply(x.contiguous(), weight, bias, groups, eps, stats)
    if impl == "cols":
        if x.dim() == 3 and x.shape[2] > 1:
            raise ValueError("impl='cols' needs an (M, C) or channels_last input; use 'rows' for (M, C, L)")
        if x.dim() > 2 and x[0, 0].numel() > 1:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        else:
            x = x.contiguous()
        return ColsGhostBN.apply(x, weight, bias, groups, eps, stats)
    if not x.is_contiguous(memory_format=fmt):
        x = x.contiguous()  # an arbitrary strided view: give the kernel dense groups
    return _LoopGhostBN.apply(x, weight, bias, groups, eps, stats)
