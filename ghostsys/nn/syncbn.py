"""SyncBatchNorm over a process (sub)group that also runs on CPU tensors and gloo.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, which rules out the 2-process CPU tests and CPU
clusters. :class:`SyncBatchNorm` keeps torch's constructor and state_dict names, defers to torch's
implementation on the devices torch supports, and otherwise runs :class:`_SyncBNFunction`:

- forward: all-reduce per-channel ``(sum, count)`` -> global mean; all-reduce the per-channel sum
  of squared deviations from that mean -> exact biased variance (two passes: no cancellation
  from ``E[x^2] - E[x]^2``); normalize; update running stats with the global mean and the
  unbiased global variance, as torch's SyncBatchNorm does.
- backward: all-reduce ``(sum dy, sum dy*(x-mean))`` with SUM, as torch does: the input gradient
  is that of the sum of the ranks' losses, and weight/bias gradients stay local sums for DDP to
  average like any other parameter gradient.

The layer never reads rank or env: the process group is passed in (None means WORLD). Its
collectives run inside a ``torch.profiler.record_function`` range named :data:`SYNCBN_RANGE`, so a
profiler can attribute them to SyncBN (a no-op costing about a microsecond when none is active).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.profiler import record_function

SYNCBN_RANGE = "ghostsys:syncbn"


def _torch_sync_device_types() -> set[str]:
    # The device types torch.nn.SyncBatchNorm.forward itself synchronizes on.
    return {"cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name()}


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision statistics lose too much; accumulate them in float32 like torch's kernels.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SyncBNFunction(torch.autograd.Function):
    """Batch normalization with statistics and input-gradient terms summed over a process group."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):  # type: ignore[override]
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xs = x.to(_stat_dtype(x.dtype))

        # Pass 1: (sum, count) -> global mean. float64 keeps counts exact and sums accurate;
        # ranks may hold different numbers of samples, so counts travel with the sums.
        packed = torch.cat([xs.sum(dims).double(), torch.tensor([x.numel() // c], dtype=torch.float64, device=x.device)])
        with record_function(SYNCBN_RANGE):
            dist.all_reduce(packed, group=group)
        count = packed[c].item()
        if count <= 1:
            # The same global count on every rank, so every rank raises: no one is left waiting.
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count)} over the group")
        mean = (packed[:c] / count).to(xs.dtype)

        # Pass 2: sum of squared deviations from the global mean -> exact biased variance.
        xmu = xs - mean.view(shape)
        sq = (xmu * xmu).sum(dims).double()
        with record_function(SYNCBN_RANGE):
            dist.all_reduce(sq, group=group)
        var = sq / count
        invstd = torch.rsqrt(var + eps).to(xs.dtype)

        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

        y = xmu * invstd.view(shape)
        if weight is not None:
            y = y * weight.to(xs.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(xs.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group, ctx.bias_dtype = count, group, None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        sdt = mean.dtype
        dys = dy.to(sdt)
        xmu = x.to(sdt) - mean.view(shape)
        sum_dy = dys.sum(dims)
        sum_dy_xmu = (dys * xmu).sum(dims)

        grad_x = None
        if ctx.needs_input_grad[0]:
            # Summed over the group: the input gradient of the sum of all ranks' losses.
            both = torch.cat([sum_dy, sum_dy_xmu])
            with record_function(SYNCBN_RANGE):
                dist.all_reduce(both, group=ctx.group)
            mean_dy, mean_dy_xmu = (both / ctx.count).split(c)
            g = dys - mean_dy.view(shape) - xmu * (invstd * invstd * mean_dy_xmu).view(shape)
            scale = invstd if weight is None else invstd * weight.to(sdt)
            grad_x = (g * scale.view(shape)).to(x.dtype)
        # Local sums: the data-parallel wrapper averages these like every other parameter gradient.
        grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm`` (same constructor and state_dict) that also syncs CPU tensors over gloo.

    Deliberately not a subclass of ``nn.SyncBatchNorm``: DistributedDataParallel refuses to wrap
    a CPU model containing one ("SyncBatchNorm layers only work with GPU modules"), which would
    rule out exactly the CPU runs this class exists for. On CUDA it runs torch's forward.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group  # None: the default (WORLD) group

    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: Tensor) -> Tensor:
        """Normalize with statistics of the whole process group in training, running stats in eval."""
        if input.device.type in _torch_sync_device_types():
            # torch's forward gathers the statistics here; its backward's all-reduce runs under the
            # autograd node SyncBatchNormBackward, which the profiler attributes by that name.
            with record_function(SYNCBN_RANGE):
                return nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self.process_group if self.process_group is not None else (dist.group.WORLD if _initialized() else None)
        if not (self.training and _initialized() and dist.get_world_size(group) > 1):
            return super().forward(input)  # eval, world size 1, or no group: plain BatchNorm

        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in torch
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats
        return _SyncBNFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.eps,
            factor,
            group,
        )


def convert_sync(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm in ``model`` by ghostsys SyncBatchNorm sharing its parameters and buffers.

    Modules that already synchronize (ours or ``nn.SyncBatchNorm``) are left as they are. Parameters
    and buffers are the same tensor objects, so device, dtype, values and any optimizer holding them
    carry over; so does train/eval mode. timm's BatchNormAct2d family becomes ``SyncBatchNormAct``
    with the same drop and act (as timm's ``convert_sync_batchnorm`` does); a BatchNorm subclass that
    cannot be swapped faithfully is refused with one error naming it (``ghostsys.nn.swap``).
    Returns the new root when the root itself is a BatchNorm, else ``model`` modified in place.
    """
    from ghostsys.nn.swap import replace_batchnorm  # swap imports this module: import it when used

    def factory(bn: _BatchNorm) -> nn.Module:
        if isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm)):
            return bn
        out = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
                            device="meta",  # placeholders only: the real tensors are assigned just below
                            bias=bn.bias is not None or not bn.affine)
        out.weight, out.bias = bn.weight, bn.bias
        out.running_mean, out.running_var = bn.running_mean, bn.running_var
        out.num_batches_tracked = bn.num_batches_tracked
        out.training = bn.training
        if hasattr(bn, "qconfig"):
            out.qconfig = bn.qconfig
        return out

    return replace_batchnorm(model, factory)
