"""The independent single-process reference for the equivalence checks (DESIGN §2-§3).

Independence is the point: nothing here calls the code under test (no ``ghostsys.nn.norms``, no
``F.batch_norm``/``F.group_norm``, no BatchNorm forward, no ``torch.optim``). Norm layers are
rebuilt from plain tensor ops and autograd, and ONE forward over the full global batch ``M`` with
explicit ghost-group index lists stands in for any factorization ``n_g × n_fp × G_layer`` (and
SyncBN over ``k``-rank subgroups). Running statistics are where the modes genuinely differ, so the
layers only record per-group moments and the buffer policies are pure functions of those records.

A :class:`Rounding` makes a run in float32 (or bf16, TF32) one more equally valid evaluation of the
same mathematics -- another sample order, the fused normalization form, randomly rounded group
statistics -- so that ``ghostsys.check.tolerance`` can measure how far that precision moves each
quantity. The float64 evaluation never uses one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ghostsys.check.ghost_groups import (Buffers, GroupSpec, GroupStat, Policy, allreduce_mean,  # noqa: F401
                                         ddp_broadcast, ghost_group_indices, mean_of_groups, per_rank, sequential)


@dataclass(frozen=True)
class Rounding:
    """One equally valid evaluation order of the reference, for a run below float64 (tolerance draws).

    ``permute_seed``: the global batch in a seeded random sample order (every reduction over samples
    -- group moments, the loss mean, weight gradients -- sums in another order; groups keep their
    members). ``fused``: normalize as ``x * scale + shift`` with ``scale = w / sqrt(var + eps)``, the
    form fused kernels (ATen, cuDNN, ghostsys' loop kernel) use, instead of ``(x - mean) / sqrt(var + eps)
    * w + b``. ``dither`` (needs ``fused``): every group's mean moves by ``±dither * (|mean| + std)``, its
    variance by ``±dither`` relative, and every normalized value by ``±dither * (|x * scale| + |shift|)``
    -- the size of the roundings a fused float32 kernel makes there -- with random signs from
    ``seed``; ``sign = -1`` negates every one of them (the antithetic partner).
    """

    permute_seed: int | None = None
    fused: bool = False
    dither: float = 0.0
    seed: int = 0
    sign: int = 1

    def __post_init__(self) -> None:
        if self.dither and not self.fused:
            raise ValueError("dither perturbs the fused normalization's roundings: set fused=True")
        if self.sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1 (got {self.sign!r})")


def _group_normalize(x: Tensor, groups: int, eps: float) -> Tensor:
    """GroupNorm without affine: per sample over (C/groups, *spatial), biased variance."""
    if x.shape[1] % groups:
        raise ValueError(f"{groups} channel groups do not divide C={x.shape[1]}")
    xg = x.reshape(x.shape[0], groups, -1)
    xc = xg - xg.mean(2, keepdim=True)
    return (xc / torch.sqrt((xc * xc).mean(2, keepdim=True) + eps)).reshape(x.shape)


class RefNorm(nn.Module):
    """Plain-op stand-in for BatchNorm-like layers ("batch"), GroupNorm ("group") and SeqNorm ("seq").

    Parameters and buffers keep the replaced layer's names (weight, bias, running_mean, running_var,
    num_batches_tracked), so the reference's named_parameters/state_dict names are the model's.
    """

    def __init__(self, kind: str, num_features: int, eps: float, momentum: float | None, weight: Tensor | None,
                 bias: Tensor | None, buffers: dict[str, Tensor | None] | None = None, channel_groups: int = 0,
                 ghost_groups: int = 1, ghost_batch_size: int | None = None) -> None:
        super().__init__()
        self.kind, self.num_features, self.eps, self.momentum = kind, num_features, eps, momentum
        self.channel_groups = channel_groups  # > 0: GroupNorm (no affine) first, with the same eps
        self.ghost_groups, self.ghost_batch_size = ghost_groups, ghost_batch_size  # used only when no groups are set
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone(), weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), bias.requires_grad)
        for name, buf in (buffers or {}).items():
            self.register_buffer(name, None if buf is None else buf.detach().clone())
        self.groups: list[GroupSpec] | None = None  # set from outside by groups_set
        self.records: list[GroupStat] = []
        self.rounding = Rounding()  # set from outside by reference_steps
        self.noise: torch.Generator | None = None  # the dither's random stream, shared by all layers

    def forward(self, x: Tensor) -> Tensor:
        """Normalize x (M, C, *spatial); in training each explicit group on its own."""
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):  # autocast: statistics in float32, as torch's kernels do
            x = x.float()
        if self.channel_groups:
            x = _group_normalize(x, self.channel_groups, self.eps)
        fused = False
        if self.kind != "group":
            if self.training or getattr(self, "running_mean", None) is None:
                x, fused = self._ghost(x), self.rounding.fused
            else:
                x = (x - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + self.eps)
        if not fused:  # the fused form applied the affine already
            if self.weight is not None:
                x = x * self.weight.view(shape)
            if self.bias is not None:
                x = x + self.bias.view(shape)
        for name in _POST_NORM:  # the replaced layer's own drop and act, if it had them
            if self._modules.get(name) is not None:
                x = self._modules[name](x)
        return x.to(dtype)

    def _signs(self, like: Tensor) -> Tensor:
        """Random ±1 shaped like `like` (negated in the antithetic draw), from the shared seeded stream."""
        s = torch.randint(0, 2, like.shape, generator=self.noise).to(like) * 2 - 1
        return s * self.rounding.sign

    def _ghost(self, x: Tensor) -> Tensor:
        m = x.shape[0]
        if self.groups is not None:
            groups = self.groups
        else:  # the replaced layer's own contiguous split (1 group for BatchNorm)
            groups = ghost_group_indices(m, 1, 1, m // self.ghost_batch_size if self.ghost_batch_size else self.ghost_groups)
        perm = torch.cat([g.indices for g in groups])
        if not torch.equal(perm.sort().values, torch.arange(m)):
            raise ValueError(f"ghost groups must cover each of the {m} samples exactly once")
        dims = [0, *range(2, x.dim())]
        pieces = []
        for g in groups:
            xg = x.index_select(0, g.indices.to(x.device))
            n = xg.numel() // xg.shape[1]
            if n < 2:
                raise ValueError(f"Expected more than 1 value per channel when training, got {n} in a ghost group")
            mu = xg.mean(dims, keepdim=True)
            xc = xg - mu
            var = (xc * xc).mean(dims, keepdim=True)  # BIASED: the normalization of paper eq. 2-3
            r = self.rounding
            if r.dither:  # moments as another rounding of the same sums could have left them
                mu = mu + r.dither * self._signs(mu) * (mu.abs() + var.sqrt())
                var = var * (1 + r.dither * self._signs(var))
                xc = xg - mu
            if r.fused:
                shape = mu.shape
                scale = torch.rsqrt(var + self.eps) * (1 if self.weight is None else self.weight.view(shape))
                shift = -mu * scale if self.bias is None else self.bias.view(shape) - mu * scale
                a = xg * scale
                if r.dither:  # and each output as the kernel's own roundings could have left it
                    a = a + r.dither * self._signs(a) * (a.abs() + shift.abs())
                pieces.append(a + shift)
            else:
                pieces.append(xc / torch.sqrt(var + self.eps))
            # Running statistics take the UNBIASED variance, as BatchNorm's do.
            self.records.append(GroupStat(g, mu.detach().flatten(), (var * (n / (n - 1))).detach().flatten(), n))
        return torch.cat(pieces).index_select(0, torch.argsort(perm).to(x.device))


# A norm layer with child modules of these names applies them after normalizing, in this order: the
# contract of timm's BatchNormAct2d (norm, then self.drop, then self.act), which ghostsys' *Act layers keep.
_POST_NORM = ("drop", "act")


def _as_reference(m: nn.Module) -> RefNorm | None:
    """The RefNorm standing in for m (with m's drop and act, if any), or None when m is not a norm layer we replace."""
    ref = _norm_reference(m)
    if ref is not None:
        children = dict(m.named_children())
        if set(children) - set(_POST_NORM):
            raise NotImplementedError(f"{type(m).__name__} has child modules {sorted(children)}; the reference "
                                      f"only knows norm layers that apply {' and '.join(_POST_NORM)} after normalizing")
        for name, child in children.items():
            ref.add_module(name, child)  # to_reference works on a deep copy: these are the copy's own
    return ref


def _norm_reference(m: nn.Module) -> RefNorm | None:
    if isinstance(m, nn.GroupNorm):
        return RefNorm("group", m.num_channels, m.eps, None, m.weight, m.bias, channel_groups=m.num_groups)
    if isinstance(m, _InstanceNorm) or not (isinstance(m, _BatchNorm) or all(
            hasattr(m, a) for a in ("weight", "bias", "running_mean", "eps"))):
        return None  # InstanceNorm has those attributes but normalizes per sample: not ours
    # BatchNorm{1,2,3}d, SyncBatchNorm, and ghostsys' GhostBatchNorm / SeqNorm / NoisyBatchNorm (norms.py):
    # all keep weight, bias, running_* and eps on the layer itself; SeqNorm adds channel_groups and
    # uses the same eps for its GroupNorm step.
    if float(getattr(m, "noise_std", 0) or 0) > 0:
        raise NotImplementedError(f"{type(m).__name__} adds random noise; the reference cannot reproduce it")
    seq = any(t.__name__ == "SeqNorm" for t in type(m).__mro__)  # SeqNorm and its subclasses (SeqNormAct)
    if seq and not isinstance(getattr(m, "channel_groups", None), int):
        raise ValueError("SeqNorm without an int `channel_groups` attribute: unknown layout")
    c = getattr(m, "num_features", None) or (m.weight if m.weight is not None else m.running_mean).numel()
    bufs = {a: getattr(m, a, None) for a in ("running_mean", "running_var", "num_batches_tracked")}
    return RefNorm("seq" if seq else "batch", c, m.eps, getattr(m, "momentum", 0.1), m.weight, m.bias, bufs,
                   m.channel_groups if seq else 0, getattr(m, "ghost_groups", None) or 1,
                   getattr(m, "ghost_batch_size", None))


def to_reference(model: nn.Module) -> nn.Module:
    """A deep copy of model with every BatchNorm/GhostBatchNorm/SyncBN, GroupNorm and SeqNorm as RefNorm."""
    ref = copy.deepcopy(model)
    top = _as_reference(ref)
    if top is not None:
        return top
    memo: dict[int, RefNorm | None] = {}  # a layer shared by several parents stays shared
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in memo:
                memo[id(child)] = _as_reference(child)
            if memo[id(child)] is not None:
                setattr(parent, name, memo[id(child)])
    return ref


def reference_layers(ref: nn.Module) -> dict[str, RefNorm]:
    """Module path -> RefNorm for every layer that normalizes over the batch (records moments)."""
    return {p: m for p, m in ref.named_modules() if isinstance(m, RefNorm) and m.kind != "group"}


@contextlib.contextmanager
def groups_set(ref: nn.Module, groups: list[GroupSpec] | None) -> Iterator[nn.Module]:
    """Within the block every reference layer normalizes these explicit groups (None: the layer's own split)."""
    layers = [m for m in ref.modules() if isinstance(m, RefNorm)]
    old = [m.groups for m in layers]
    for m in layers:
        m.groups = groups
    try:
        yield ref
    finally:
        for m, g in zip(layers, old):
            m.groups = g


@dataclass
class RefTrace:
    """What the reference computed; parameter/buffer names are the ORIGINAL model's."""

    logits: Tensor  # first step, (M, classes)
    loss: Tensor  # first step
    grads: dict[str, Tensor]  # first step
    weights: dict[str, Tensor]  # after k steps
    stats: list[dict[str, list[GroupStat]]]  # per step: layer path -> its groups' moments, in order
    order: list[Tensor]  # per step: the sample ids of the global batch, by position
    groups: list[GroupSpec] | None
    initial_buffers: dict[str, Buffers] = field(default_factory=dict)  # layer path -> before step 0
    momenta: dict[str, float | None] = field(default_factory=dict)

    def with_groups(self, groups: list[GroupSpec]) -> "RefTrace":
        """The same trace with its records relabelled to another factorization of the SAME ghost groups.

        Two factorizations with equal index sets normalize identically; only the group metadata the
        buffer policies read (ranks, micro-batch, order met) differs, so one run serves both.
        """
        key = lambda g: tuple(g.indices.tolist())  # noqa: E731
        by_key = {key(g): g for g in groups}
        if self.groups is None or set(by_key) != {key(g) for g in self.groups}:
            raise ValueError("with_groups needs the same ghost groups (index sets) the trace was run with")
        rank = {key(g): i for i, g in enumerate(groups)}
        stats = [{path: sorted((dataclasses.replace(s, spec=by_key[key(s.spec)]) for s in recs),
                               key=lambda s: rank[key(s.spec)]) for path, recs in step.items()} for step in self.stats]
        return dataclasses.replace(self, stats=stats, groups=list(groups))

    def layer_stats(self, layer: str) -> list[GroupStat]:
        """One layer's group moments over all steps, in the order they were met."""
        return [s for step in self.stats for s in step[layer]]

    def buffers(self, policy: Policy = sequential, **kw) -> dict[str, Tensor]:
        """Every norm layer's buffers after all steps under `policy` (kw: rank=, per=, ...)."""
        out: dict[str, Tensor] = {}
        for layer, init in self.initial_buffers.items():
            res = policy(self.layer_stats(layer), init, self.momenta[layer], **kw)
            out.update({f"{layer}.{k}" if layer else k: v for k, v in res.items()})
        return out


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over the batch, from log_softmax and gather (no F.cross_entropy).

    Low-precision logits (autocast) are taken in float32 first: autocast runs cross-entropy in float32.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return -(logits.log_softmax(1).gather(1, y[:, None])).mean()


def sgd_update_(params: Sequence[tuple[str, nn.Parameter]], state: dict[str, Tensor], lr: float,
                momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD semantics (dampening 0, no Nesterov), by hand: d = g + wd·p; buf; p -= lr·buf."""
    with torch.no_grad():
        for name, p in params:
            if p.grad is None:
                continue  # as torch: a parameter without a gradient is not touched
            d = p.grad + weight_decay * p if weight_decay else p.grad.clone()
            if momentum:
                d = state[name] = d if name not in state else momentum * state[name] + d
            p -= lr * d


def reference_steps(model: nn.Module, batches: Sequence[tuple], *, groups: list[GroupSpec] | None, lr: float,
                    momentum: float = 0.0, weight_decay: float = 0.0, k_steps: int = 1,
                    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                    rounding: Rounding | None = None) -> RefTrace:
    """k SGD steps of the reference on full global batches (x, y[, ids]) normalized in `groups`.

    `rounding` (runs below float64 only) picks another equally valid evaluation order; the trace is
    reported in the original sample order and group specs either way.
    """
    if len(batches) < k_steps:
        raise ValueError(f"{k_steps} steps need {k_steps} batches (got {len(batches)})")
    rounding = rounding or Rounding()
    ref = to_reference(model).to(device=device, dtype=dtype).train()
    params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]  # names are the model's
    layers = reference_layers(ref)
    noise = torch.Generator().manual_seed(rounding.seed)
    for m in ref.modules():
        if isinstance(m, RefNorm):
            m.rounding, m.noise = rounding, noise
    perm = run_groups = None
    if rounding.permute_seed is not None:
        if groups is None:
            raise ValueError("a permuted sample order needs explicit ghost groups (the layers' own split would change)")
        perm = torch.randperm(len(batches[0][1]), generator=torch.Generator().manual_seed(rounding.permute_seed))
        inv = torch.argsort(perm)  # original sample i sits at position inv[i]
        run_groups = [dataclasses.replace(g, indices=inv[g.indices]) for g in groups]
        original = {id(r): g for r, g in zip(run_groups, groups)}
    trace = RefTrace(torch.empty(0), torch.empty(0), {}, {}, [], [], groups)
    for path, layer in layers.items():
        bufs = {n: getattr(layer, n, None) for n in ("running_mean", "running_var", "num_batches_tracked")}
        trace.initial_buffers[path] = {n: b.detach().clone() for n, b in bufs.items() if b is not None}
        trace.momenta[path] = layer.momentum
    state: dict[str, Tensor] = {}
    for step in range(k_steps):
        x, y, *rest = batches[step]
        x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        y = y.to(device)
        if perm is not None:
            x, y = x[perm.to(x.device)], y[perm.to(y.device)]
        for layer in layers.values():
            layer.records = []
        with groups_set(ref, run_groups if perm is not None else groups):
            logits = ref(x)
        loss = cross_entropy(logits, y)
        for _, p in params:
            p.grad = None
        loss.backward()
        if perm is not None:
            logits = logits[inv.to(logits.device)]
            for layer in layers.values():
                layer.records = [dataclasses.replace(r, spec=original[id(r.spec)]) for r in layer.records]
        if step == 0:
            trace.logits, trace.loss = logits.detach().clone(), loss.detach().clone()
            trace.grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
        trace.stats.append({path: [dataclasses.replace(s, step=step) for s in layer.records] for path, layer in layers.items()})
        trace.order.append(rest[0].clone() if rest else torch.arange(len(y)))
        sgd_update_(params, state, lr, momentum, weight_decay)
    trace.weights = {n: p.detach().clone() for n, p in params}
    return trace
