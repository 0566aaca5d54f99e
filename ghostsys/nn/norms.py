"""Normalization layers of the papers and the tools to put them into any model.

``GhostBatchNorm`` (GhostNorm), ``SeqNorm`` (GroupNorm then GhostNorm, one affine) and
``NoisyBatchNorm``; ``make_norm`` builds any of them (or BatchNorm / GroupNorm / nothing) by name.
``ghostsys.nn.swap`` (``replace_batchnorm``, ``convert``) puts them into an existing model.

Conventions (DESIGN.md section 2): inputs are ``(M, C, *spatial)`` with 0 to 3 spatial dims;
ghost group k is the CONTIGUOUS block of samples ``[k*M/G, (k+1)*M/G)``; the biased variance
normalizes, with eps inside the square root; running variances are unbiased, as BatchNorm's.
Layers take everything as explicit arguments and never read rank, device, env vars or globals.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ghostsys.nn._ghost_kernels import IMPLS, Average, Sequential, ghost_batch_norm

__all__ = ["GhostBatchNorm", "SeqNorm", "NoisyBatchNorm", "make_norm", "STATS_POLICIES", "NORM_KINDS"]

STATS_POLICIES = ("mean", "sequential")
NORM_KINDS = ("batch", "ghost", "seq", "group", "noisy", "none")
_MIN_GHOST_BATCH = 4  # the papers: 1 sample is undefined, 2 collapse (M, C) activations to +-1


def _check_rank(x: Tensor, who: str) -> None:
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"{who}: expected input (M, C, *spatial) with 2 to 5 dims, got shape {tuple(x.shape)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _batch_norm_step(module: _NormBase) -> tuple[bool, float]:
    """BatchNorm's bookkeeping for one forward: (use batch statistics?, EMA factor); counts the step."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    use_batch = module.training or (module.running_mean is None and module.running_var is None)
    return use_batch, factor


class GhostBatchNorm(_NormBase):
    """Ghost batch norm: BatchNorm applied independently to G contiguous blocks of the batch.

    The constructor is ``nn.BatchNorm{1,2,3}d``'s -- the same arguments, positions and meanings
    (``num_features, eps, momentum, affine, track_running_stats, device, dtype, *, bias``) -- plus
    keyword-only ghost arguments: give exactly one of ``ghost_groups`` (G, fixed; M must be divisible
    by it) or ``ghost_batch_size`` (samples per group, so G = M / ghost_batch_size). Parameters and
    buffers are BatchNorm's (weight, bias unless ``bias=False``, running_mean, running_var,
    num_batches_tracked), so state dicts interchange with ``nn.BatchNorm{1,2,3}d``; with one group
    the layer *is* BatchNorm (PyTorch's own BatchNorm module tests pass on it). Eval mode
    uses the running statistics and never ghosts (or, with ``track_running_stats=False``,
    normalizes over the whole batch, as BatchNorm does).

    Running statistics (``stats_policy``):

    * ``"mean"`` (default): one EMA update per forward, from the mean of the group means and the
      mean of the group unbiased variances; ``num_batches_tracked += 1``. It is the default
      because (1) ``momentum`` keeps its per-optimizer-step meaning whatever G is; (2) the
      estimate uses all M samples, whereas ``"sequential"`` with many groups effectively remembers
      only the last few groups (each update discounts the previous ones by 1 - momentum); and
      (3) it is what data-parallel training with all-reduced (averaged) buffers gives.
    * ``"sequential"``: one update per group, in group order, ``num_batches_tracked += G``:
      exactly what ``nn.BatchNorm`` does under gradient accumulation over the same chunks
      (bit-identical with the ``"chunks"`` and CPU ``"loop"`` kernels; ``"auto"`` takes chunks).

    ``momentum=None`` is the cumulative moving average (factor 1/num_batches_tracked, counted per
    group under ``"sequential"``). ``impl`` picks the training kernel (``ghostsys.nn._ghost_kernels``
    documents each and the measurements behind ``"auto"``): ``"fused"`` ((M, C) and channels_last,
    CPU float32/float64) is one compiled call (``ghostsys.nn.fused``, built once per machine);
    ``"rows"`` (NCHW-like inputs) and ``"cols"`` ((M, C) and channels_last) take all groups' moments
    in a few whole-tensor passes; ``"loop"`` (a native kernel per group; CPU float32/float64) and
    ``"chunks"`` (BatchNorm on each chunk, then a cat) run ATen's batch norm per group; these five
    give first-order gradients only. ``"vectorized"`` (one BatchNorm call over all groups via two
    copies) is twice differentiable. ``"auto"`` picks by measurement on CPU float32/float64 and
    takes ``"vectorized"`` elsewhere (so on CUDA); with the sequential policy it takes the chunks,
    whose buffer updates are BatchNorm's bit for bit. Where the fused kernel cannot be built (no
    C++ compiler), ``"auto"`` warns once and uses the ATen kernels; under ``torch.compile``, which
    cannot trace into the compiled kernel, ``"auto"`` takes ``"cols"`` (and an explicit ``"fused"``
    fails there).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, bias: bool = True, ghost_groups: int | None = None,
                 ghost_batch_size: int | None = None, stats_policy: str = "mean", impl: str = "auto") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        if (ghost_groups is None) == (ghost_batch_size is None):
            raise ValueError("give exactly one of ghost_groups (number of groups) or ghost_batch_size (samples "
                             f"per group); got ghost_groups={ghost_groups}, ghost_batch_size={ghost_batch_size}")
        for name, v in (("ghost_groups", ghost_groups), ("ghost_batch_size", ghost_batch_size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if stats_policy not in STATS_POLICIES:
            raise ValueError(f"stats_policy must be one of {STATS_POLICIES}, got {stats_policy!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.ghost_groups, self.ghost_batch_size = ghost_groups, ghost_batch_size
        self.stats_policy, self.impl = stats_policy, impl
        self._warned_small = False  # per instance: warn once, not on every step

    def extra_repr(self) -> str:
        ghost = (f"ghost_groups={self.ghost_groups}" if self.ghost_groups is not None
                 else f"ghost_batch_size={self.ghost_batch_size}")
        return f"{super().extra_repr()}, {ghost}, stats_policy={self.stats_policy!r}"

    def _check_input_dim(self, input: Tensor) -> None:
        _check_rank(input, type(self).__name__)

    def num_groups(self, batch_size: int) -> int:
        """G for a batch of `batch_size` samples; ValueError (with the valid choices) if it does not divide."""
        m = batch_size
        if self.ghost_groups is not None:
            if m % self.ghost_groups:
                raise ValueError(
                    f"{type(self).__name__}: a batch of M={m} samples cannot be split into ghost_groups="
                    f"{self.ghost_groups} equal contiguous groups; valid ghost_groups for M={m} (divisors of M): "
                    f"{_divisors(m)}")
            return self.ghost_groups
        if m % self.ghost_batch_size:
            raise ValueError(
                f"{type(self).__name__}: a batch of M={m} samples cannot be split into ghost batches of "
                f"ghost_batch_size={self.ghost_batch_size}; valid ghost_batch_size for M={m} (divisors of M): "
                f"{_divisors(m)}")
        return m // self.ghost_batch_size

    def _validate_groups(self, x: Tensor, groups: int) -> None:
        per_group = x.shape[0] // groups
        if per_group * math.prod(x.shape[2:]) == 1:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel in each ghost group when "
                f"training, got input size {tuple(x.shape)} in {groups} groups of {per_group} sample(s)")
        if per_group < _MIN_GHOST_BATCH and not self._warned_small:
            self._warned_small = True
            warnings.warn(
                f"{type(self).__name__}: ghost batches of {per_group} sample(s) (M={x.shape[0]}, G={groups}); "
                f"under {_MIN_GHOST_BATCH} the statistics are degenerate (2 samples collapse (M, C) "
                "activations to +-1). Warned once per layer.", UserWarning, stacklevel=3)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each ghost group in training; running (or whole-batch) statistics in eval."""
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels, got {input.shape[1]}")
        return self._ghost_norm(input, self.weight, self.bias)

    def _ghost_norm(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if not self.training:  # running statistics, never ghosts (whole batch when untracked)
            use_batch = self.running_mean is None and self.running_var is None
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, use_batch, 0.0, self.eps)
        tracking = self.track_running_stats and self.running_mean is not None
        groups = self.num_groups(x.shape[0]) if x.shape[0] else 1
        if groups > 1 and not self.eps > 0:  # F.batch_norm's own check, which the ghost kernels bypass
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if x.shape[0]:
            self._validate_groups(x, groups)
        if groups == 1:  # plain BatchNorm: its own kernel, its own bookkeeping
            factor = self._next_factor() if tracking else 0.0
            return F.batch_norm(x, self.running_mean if tracking else None, self.running_var if tracking else None,
                                weight, bias, True, factor, self.eps)
        stats = None
        if tracking and self.stats_policy == "sequential":
            stats = Sequential(self.running_mean, self.running_var, self._next_factors(groups))
        elif tracking:  # one EMA step: running += factor * (mean group moment - running)
            stats = Average(self.running_mean, self.running_var, self._next_factor())
        return ghost_batch_norm(x, groups, weight, bias, self.eps, stats, self.impl)

    def _next_factor(self) -> float:
        """Count one update and return its EMA factor, as BatchNorm does for one forward."""
        return self._next_factors(1)[0]

    def _next_factors(self, k: int) -> list[float]:
        """Count k updates and return their EMA factors, as BatchNorm does for k forwards (one add_)."""
        if self.num_batches_tracked is None:
            return [0.0 if self.momentum is None else self.momentum] * k
        # Read the count only when the factor needs it (a device sync on GPUs), as BatchNorm does.
        n0 = int(self.num_batches_tracked) if self.momentum is None else 0
        self.num_batches_tracked.add_(k)
        return [1.0 / float(n0 + i) for i in range(1, k + 1)] if self.momentum is None else [self.momentum] * k


class SeqNorm(GhostBatchNorm):
    """Sequential normalization: GroupNorm(G_C) without affine, then GhostNorm(G_M) without affine,
    then ONE per-channel affine (gamma, beta). The same eps serves both normalizations; the running
    statistics (of the GroupNorm output) behave as GhostBatchNorm's. Constructor: GhostBatchNorm's
    (BatchNorm's arguments) plus the keyword-only ``channel_groups`` (G_C)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, channel_groups: int, bias: bool = True,
                 ghost_groups: int | None = None, ghost_batch_size: int | None = None, stats_policy: str = "mean",
                 impl: str = "auto") -> None:
        if isinstance(channel_groups, bool) or not isinstance(channel_groups, int) or channel_groups < 1:
            raise ValueError(f"channel_groups must be a positive int, got {channel_groups!r}")
        if num_features % channel_groups:
            raise ValueError(f"SeqNorm: num_features={num_features} is not divisible by channel_groups="
                             f"{channel_groups}; valid channel_groups: {_divisors(num_features)}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         ghost_groups=ghost_groups, ghost_batch_size=ghost_batch_size, stats_policy=stats_policy,
                         impl=impl)
        self.channel_groups = channel_groups

    def extra_repr(self) -> str:
        return f"channel_groups={self.channel_groups}, {super().extra_repr()}"

    def forward(self, input: Tensor) -> Tensor:
        """GroupNorm over channel groups, then ghost norm with this layer's single affine fused in."""
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"SeqNorm: expected {self.num_features} channels, got {input.shape[1]}")
        # The affine multiplies the ghost-normalized values, so fusing it into the ghost kernel is exact.
        return self._ghost_norm(F.group_norm(input, self.channel_groups, None, None, self.eps), self.weight, self.bias)


class NoisyBatchNorm(_NormBase):
    """BatchNorm with Gaussian noise N(0, noise_std^2) added to its input in training only (the
    papers' Noisy BatchNorm ablation); eval mode is exactly BatchNorm's. Any input rank 2-5.
    The noise comes from torch's default generator, as Dropout's does. Constructor: BatchNorm's
    arguments plus the keyword-only ``noise_std`` (0 makes the layer BatchNorm)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, noise_std: float, bias: bool = True) -> None:
        if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not noise_std >= 0:
            raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.noise_std = float(noise_std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_std={self.noise_std}"

    def _check_input_dim(self, input: Tensor) -> None:
        _check_rank(input, type(self).__name__)

    def forward(self, input: Tensor) -> Tensor:
        """Add noise (training only), then batch-normalize exactly as nn.BatchNorm would."""
        self._check_input_dim(input)
        if self.training and self.noise_std > 0:
            input = input + torch.empty_like(input).normal_(0.0, self.noise_std)
        use_batch, factor = _batch_norm_step(self)
        track = not self.training or self.track_running_stats  # BatchNorm's rule, verbatim
        return F.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, use_batch, factor, self.eps)


# --- building layers by name ------------------------------------------------------------------------

_BN_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_COMMON_KW = ("eps", "momentum", "affine", "track_running_stats", "device", "dtype", "bias")
# Per kind: (required, optional) keyword arguments beyond the common BatchNorm-style ones.
_KIND_KW: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "batch": ((), ()),
    "ghost": ((), ("ghost_groups", "ghost_batch_size", "stats_policy", "impl")),
    "seq": (("channel_groups",), ("ghost_groups", "ghost_batch_size", "stats_policy", "impl")),
    "group": (("channel_groups",), ()),
    "noisy": (("noise_std",), ()),
    "none": ((), ()),
}


def make_norm(kind: str, num_features: int, *, dim: int = 2, **kw) -> nn.Module:
    """Build a norm layer by name: batch, ghost, seq, group, noisy or none (see NORM_KINDS).

    ``dim`` (1, 2 or 3) picks ``nn.BatchNorm{dim}d`` for ``batch``; the other layers take any rank.
    BatchNorm-style keywords (eps, momentum, affine, track_running_stats, device, dtype, bias) are
    accepted by every kind and dropped where the layer has no such notion (group: momentum and
    running stats; none: all), so one call site can build any kind.
    """
    if kind not in _KIND_KW:
        raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(NORM_KINDS)}")
    if dim not in _BN_BY_DIM:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
    required, optional = _KIND_KW[kind]
    missing = [k for k in required if kw.get(k) is None]
    if missing:
        raise ValueError(f"norm kind {kind!r} needs the argument(s) {', '.join(missing)}")
    unknown = sorted(set(kw) - set(_COMMON_KW) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"norm kind {kind!r} does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(required + optional + _COMMON_KW)}")
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        keep = {k: kw[k] for k in ("eps", "affine", "device", "dtype", "bias") if k in kw}
        return nn.GroupNorm(kw["channel_groups"], num_features, **keep)
    if kind == "batch":
        return _BN_BY_DIM[dim](num_features, **kw)
    if kind in ("ghost", "seq") and kw.get("ghost_groups") is None and kw.get("ghost_batch_size") is None:
        raise ValueError(f"norm kind {kind!r} needs the argument ghost_groups or ghost_batch_size")
    return {"ghost": GhostBatchNorm, "seq": SeqNorm, "noisy": NoisyBatchNorm}[kind](num_features, **kw)
