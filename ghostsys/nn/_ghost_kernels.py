"""Training-mode ghost batch normalization kernels behind ``ghostsys.nn.norms`` (private).

Six interchangeable implementations of "normalize each of G contiguous blocks of the batch on its
own statistics, then apply one per-channel affine"; ``choose_impl`` is what ``impl="auto"`` runs.

* ``fused`` (``ghostsys.nn.fused``, CPU float32/float64): (M, C), channels_last and NCHW memory in
  ONE compiled call each way (C++, built once per machine), the running-statistics step included.
  ``cols`` below is the same arithmetic as ~25 ATen ops, and at SimpleNet's sizes their dispatch
  (~5-10 us each), not the arithmetic, was the gap to nn.BatchNorm.

* ``rows`` and ``cols`` (``_ghost_moments``): every group's moments from a fixed number of
  whole-tensor ATen passes, closed-form backward from per-(group, channel) sums. ``rows`` reads
  NCHW-like memory as (M*C, S) rows (group-norm row moments pooled per group, eval-mode batch-norm
  affine, group-norm-backward sums); ``cols`` reads (M, C) and channels_last memory as a free
  (G, m*S, C) view (column sums, a centred copy, two addcmul passes each way).
* ``chunks``: ``torch.batch_norm`` on each group under autograd, then one ``torch.cat`` -- BatchNorm
  over the chunks itself, so with the ``Sequential`` plan its buffers are BatchNorm's bit for bit.
  One native forward and one native backward node per group and no Python in the backward: the
  least overhead per group, for a copy each way.
* ``loop`` (CPU): a ``torch.autograd.Function`` around ATen's native kernels. A ghost group
  ``x[k*m:(k+1)*m]`` is a contiguous slice of the batch dimension, outermost in NCHW *and* in
  channels_last, so each group is a dense tensor of the input's layout. Forward: the native kernel
  per group writing straight into its slice of one output (``out=``, no cat), or for NCHW rows of
  >= 64 values the ``rows`` moments of all groups at once. Backward per group: the native backward
  (NCHW: dx into a scratch, then copied; channels_last: sums only, then two addcmul passes). Its
  ``Sequential`` updates are also bit-identical to BatchNorm's.
* ``vectorized``: plain autograd ops, device-agnostic and twice differentiable: (G, m, C, *S) is
  copied to (m, G*C, *S) so that ONE ``F.batch_norm`` call (cuDNN on CUDA) normalizes every
  (group, channel) pair, and copied back. The choice off CPU float32/float64 -- so on CUDA, where
  the loop would pay a kernel launch per group (no GPU was at hand to measure the others there).

"auto" on CPU float32/float64, and the measurements behind it (forward+backward over nn.BatchNorm
at the same shape and layout, one thread, thread CPU clock, the papers' layer shapes, G = 2..64
with ghost batches >= 4; a shared 2-core AMD EPYC VM at load 8-14, so +-20%; ``python -m
ghostsys.bench`` reproduces the table):

* sequential policy -> ``chunks``: bit-identical buffers; against the loop (the other bit-identical
  kernel) 0.57-0.96x on (M, C), 0.87-1.04x on the image shapes.
* contiguous (M, C, *S) with S > 1 (NCHW, the models' default) of at most 2^21 values (every
  ResNet-56 layer) -> ``fused``: 0.51-0.88x BatchNorm at 2 threads where ``rows`` is 0.61-1.14x
  (its pairs run in parallel; rows' ATen passes scale less), on a par at 1 thread (0.63-0.92x vs
  0.53-0.90x). Larger (WRN-28-10), or without the fused kernel -> ``rows``: 0.46-0.56x on the
  WRN-28-10 shapes, 0.66-0.88x on ResNet-56's (128, 16..64, ...) where the chunk loop is
  1.1-1.6x and the loop 0.9-1.8x. ATen's NCHW batch-norm statistics loop is scalar (double
  accumulation), which is why a few vectorized passes beat it.
* (M, C) and channels_last -> ``fused`` (a quiet machine, one thread, thread clock: SimpleNet's
  (256, 300) / (256, 512) 0.89-1.18x BatchNorm for G = 2..64 where ``cols`` was 1.8-2.6x;
  channels_last ResNet-56 / WRN-28-10 shapes 0.75-1.01x where the loop / cols were 0.8-1.4x; long
  groups merge 64-row blocks' moments, one memory read for the statistics: WRN-28-10's
  (128, 160, 32, 32) at G = 2 went from 1.22x to 0.97x).
  Where it cannot be built, the ATen kernels as before:
* (M, C) and channels_last, ghost groups of <= 16384 values -> ``cols``; larger groups -> a native
  kernel per group, ``chunks`` for (M, C) (SimpleNet G=2: 1.2-1.5x where cols is 1.9-2.5x) and
  ``loop`` for channels_last (1.1-1.3x on the WRN shapes where cols is 1.9-2.4x; its out= writes
  save the cat). At <= 16384 values per group the per-group call overhead (~10 us, twice) exceeds
  cols' extra passes: (256, 512) G=8 cols 1.4-1.7x vs chunks 2.2-2.4x; (128, 64, 8, 8) G=32 cols
  1.9x vs loop 3.1x. BatchNorm is itself cheap and vectorized on these layouts (0.1-0.3 ms on
  SimpleNet's), so these are the shapes where targets are not met: see the benchmark.

Rejected, measured: var_mean / vector_norm reductions over a (G, m, C) view (Welford / norm
kernels: 3-25x slower than sum); one group-norm call with one group per channel on a channels_last
(G, C, m*S) view (its channels_last kernel is scalar for one channel per group and uses the one-pass
E[x^2] - E[x]^2: 4-10x slower and less accurate); transposing to (G, C, m*S) for the row kernels
(ATen's transposing copies: 3-20x); torch.compile of the Figure-2 function (inductor C++): 45 s to
compile the first shape and 5 s each further shape, 0.4-1.0x on images but 2x on (256, 300).

Running statistics go through a small plan object so that each implementation can update them the
way the policy needs (``Sequential``, ``Collect``, ``Average`` in ``_ghost_common``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ghostsys.nn._ghost_common import (Average, Collect, Sequential, Stats, apply_plan, as_sequential, like,
                                       memory_format_of, row_moments, spatial)
from ghostsys.nn._ghost_moments import ColsGhostBN, RowsGhostBN
from ghostsys.nn import fused

__all__ = ["Sequential", "Collect", "Average", "ghost_batch_norm", "memory_format_of", "IMPLS", "choose_impl"]

IMPLS = ("auto", "loop", "chunks", "vectorized", "rows", "cols", "fused")
_aten = torch.ops.aten
# Switches between equivalent strategies of the loop implementation (module constants so tests
# can force each path on small shapes; see the module docstring for the measurements behind them).
_ROW_MOMENTS_MIN_SPATIAL = 64  # shorter layer-norm rows do not beat the native loop (measured)
_ROW_CHUNK_BYTES = 1 << 20  # layer-norm scratch per call: about an L2 cache, reused call to call
_FUSED_BACKWARD = True  # NCHW: fused native backward into scratch + copy (else two addcmul passes)
# "auto", (M, C) and channels_last inputs: ghost groups of at most this many values go to "cols",
# larger ones to a native kernel per group ("chunks" for (M, C), "loop" for channels_last).
_COLS_MAX_GROUP_NUMEL = 16384
# "auto", NCHW inputs: the fused kernel up to this many values, "rows" above (see choose_impl).
_FUSED_MAX_PLANAR_NUMEL = 1 << 21
# The previous dispatch's loop/vectorized crossover; "auto" no longer uses it (it picks among the
# kernels above), but tests/test_norms.py still asserts its test input is above it.
_LOOP_MIN_GROUP_NUMEL = 4096
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
    hw = spatial(x)
    row_mean, row_var = (t.view(groups, m, c) for t in row_moments(x.view(-1, hw), _ROW_CHUNK_BYTES))
    mean = row_mean.mean(1)
    # Law of total variance over the group's m equal-sized rows (biased, as the normalization uses).
    var = row_var.mean(1) + (row_mean - mean.unsqueeze(1)).square().mean(1)
    save_mean.copy_(mean)
    torch.rsqrt(var + eps, out=save_invstd)
    scale = save_invstd if weight is None else save_invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    view = (groups, 1, c, 1)
    # Two ops, each vectorized with one broadcast operand (an addcmul with two runs ATen's scalar loop).
    torch.mul(x.view(groups, m, c, hw), scale.view(view), out=y.view(groups, m, c, hw)).add_(shift.view(view))
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
        if _loop_row_moments(x, "loop") and not isinstance(stats, Sequential):
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
            n = m * spatial(x)
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
    m, c, sp = x.shape[0] // groups, x.shape[1], x.shape[2:]
    xt = x.unflatten(0, (groups, m)).transpose(0, 1).reshape(m, groups * c, *sp)
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
    y.unflatten(0, (groups, m)).copy_(yt.view(m, groups, c, *sp).transpose(0, 1))
    if isinstance(stats, Sequential):  # BatchNorm's update, once per group in order (equal up to rounding)
        apply_plan(stats, moments.mean, moments.var)
    return y


def _chunks(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
            stats: Stats) -> Tensor:
    """torch.batch_norm on each group under autograd, then one torch.cat: BatchNorm over the chunks.

    No Python in the backward (one native batch-norm backward node per group), so it has the least
    overhead per group; it pays a copy each way (cat forward, its split backward).
    """
    if isinstance(stats, Sequential):  # the real buffers, BatchNorm's own update per group: bit-identical
        plan = [(stats.running_mean, stats.running_var, f) for f in stats.momenta]
    elif isinstance(stats, Collect):  # momentum 1 on a zeroed row: the kernel writes the group's moments there
        plan = list(zip(stats.mean.unbind(0), stats.var.unbind(0), [1.0] * groups))
    else:
        plan = [(None, None, 0.0)] * groups
    # torch.batch_norm: F.batch_norm's Python checks cost more than the call on small groups.
    cudnn = torch.backends.cudnn.enabled
    return torch.cat([torch.batch_norm(xg, weight, bias, rm, rv, True, f, eps, cudnn)
                      for xg, (rm, rv, f) in zip(x.chunk(groups), plan)])


def _cols_dense(x: Tensor) -> Tensor:
    """x dense in the layout the column kernels read: (M, C) rows, channels_last(_3d) for images."""
    if x.dim() > 2 and spatial(x) > 1:
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.contiguous()


def _fused_dense(x: Tensor) -> Tensor:
    """x dense in a layout the fused kernel reads: contiguous NCHW-like as it is, else as _cols_dense."""
    if x.dim() > 2 and spatial(x) > 1 and x.is_contiguous():
        return x
    return _cols_dense(x)


def _loop_row_moments(x: Tensor, impl: str) -> bool:
    """Whether the loop's forward takes per-(sample, channel) row moments here (NCHW, long rows)."""
    return (impl == "loop" and x.dim() > 2 and memory_format_of(x) == torch.contiguous_format
            and spatial(x) >= _ROW_MOMENTS_MIN_SPATIAL)


def choose_impl(x: Tensor, groups: int, stats: Stats, weight: Tensor | None = None,
                bias: Tensor | None = None) -> str:
    """The kernel "auto" runs for this input (see the module docstring for the measurements)."""
    # Cheap attribute reads first (no torch.device objects): this runs on every training forward.
    if not x.is_cpu or x.dtype not in (torch.float32, torch.float64):
        return "vectorized"
    if isinstance(stats, Sequential):
        return "chunks"  # BatchNorm over the chunks itself: its buffer updates bit for bit
    if x.dim() > 2 and spatial(x) > 1 and memory_format_of(x) == torch.contiguous_format:
        # NCHW: the fused kernel's pairs in parallel up to ResNet-56's largest layer; beyond, rows' two memory
        # passes (one vectorized row-moment pass) beat its three (WRN-28-10: 0.5-0.6x vs 0.6-0.8x BatchNorm).
        if (x.numel() > _FUSED_MAX_PLANAR_NUMEL or not fused.supports(x, weight, bias, stats)
                or torch.compiler.is_compiling() or not fused.available()):
            return "rows"
        return "fused"
    # Under torch.compile the ATen formulation, which the compiler traces (and fuses itself); the compiled
    # kernel is opaque to it (its C++ autograd cannot run on the tracer's fake tensors).
    if fused.supports(x, weight, bias, stats) and not torch.compiler.is_compiling() and fused.available():
        return "fused"
    if x.numel() // groups <= _COLS_MAX_GROUP_NUMEL:
        return "cols"
    return "chunks" if x.dim() == 2 or spatial(x) == 1 else "loop"


def ghost_batch_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                     stats: Stats = None, impl: str = "auto") -> Tensor:
    """Training-mode batch norm over each of `groups` contiguous batch blocks, then the affine."""
    if impl == "auto":
        impl = choose_impl(x, groups, stats, weight, bias)
        if impl == "fused":  # choose_impl checked it all: the shortest path (this runs every training forward)
            return fused.ghost_cols(_fused_dense(x), groups, weight, bias, eps, stats)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(stats, Average) and impl in ("loop", "chunks", "vectorized"):
        if impl != "vectorized" and 0.0 <= stats.factor <= 1.0 and not _loop_row_moments(x, impl):
            # The native kernel updates the real buffers group by group; these factors make its G
            # updates one step toward the mean of the group moments (see as_sequential): no extra ops.
            stats = as_sequential(stats, groups)
        else:  # collect the group moments into (G, C) rows, then apply the plan from them
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
    if impl == "fused":
        x = _fused_dense(x)
        if not fused.supports(x, weight, bias, stats):
            raise ValueError("impl='fused' needs a non-empty CPU float32/float64 input with parameters and running buffers "
                             "of the same dtype; use impl='auto'")
        if not fused.available():
            raise RuntimeError(f"impl='fused': the kernel could not be built ({fused.build_error()}); use impl='auto'")
        return fused.ghost_cols(x, groups, weight, bias, eps, stats)
    if impl == "cols":
        if x.dim() == 3 and x.shape[2] > 1:
            raise ValueError("impl='cols' needs an (M, C) or channels_last input; use 'rows' for (M, C, L)")
        return ColsGhostBN.apply(_cols_dense(x), weight, bias, groups, eps, stats)
    if not x.is_contiguous(memory_format=fmt):
        x = x.contiguous()  # an arbitrary strided view: give the kernel dense groups
    return _LoopGhostBN.apply(x, weight, bias, groups, eps, stats)
