"""The independent single-process reference for the equivalence checks (DESIGN §2-§3).

Independence is the point: nothing here calls the code under test (no ``ghostsys.nn.norms``, no
``F.batch_norm``/``F.group_norm``, no BatchNorm forward, no ``torch.optim``). Norm layers are
rebuilt from plain tensor ops and autograd, and ONE forward over the full global batch ``M`` with
explicit ghost-group index lists stands in for any factorization ``n_g × n_fp × G_layer`` (and
SyncBN over ``k``-rank subgroups). Running statistics are where the modes genuinely differ, so the
layers only record per-group moments and the buffer policies are pure functions of those records.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ghostsys.check.report import TOLERANCES, Row, compare, tolerance  # noqa: F401 -- part of this API

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

    def forward(self, x: Tensor) -> Tensor:
        """Normalize x (M, C, *spatial); in training each explicit group on its own."""
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        if self.channel_groups:
            x = _group_normalize(x, self.channel_groups, self.eps)
        if self.kind != "group":
            if self.training or getattr(self, "running_mean", None) is None:
                x = self._ghost(x)
            else:
                x = (x - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + self.eps)
        if self.weight is not None:
            x = x * self.weight.view(shape)
        if self.bias is not None:
            x = x + self.bias.view(shape)
        for name in _POST_NORM:  # the replaced layer's own drop and act, if it had them
            if self._modules.get(name) is not None:
                x = self._modules[name](x)
        return x

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
    """Mean cross-entropy over the batch, from log_softmax and gather (no F.cross_entropy)."""
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
                    dtype: torch.dtype = torch.float64) -> RefTrace:
    """k SGD steps of the reference on full global batches (x, y[, ids]) normalized in `groups`."""
    if len(batches) < k_steps:
        raise ValueError(f"{k_steps} steps need {k_steps} batches (got {len(batches)})")
    ref = to_reference(model).to(dtype).train()
    params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]  # names are the model's
    layers = reference_layers(ref)
    trace = RefTrace(torch.empty(0), torch.empty(0), {}, {}, [], [], groups)
    for path, layer in layers.items():
        bufs = {n: getattr(layer, n, None) for n in ("running_mean", "running_var", "num_batches_tracked")}
        trace.initial_buffers[path] = {n: b.detach().clone() for n, b in bufs.items() if b is not None}
        trace.momenta[path] = layer.momentum
    state: dict[str, Tensor] = {}
    for step in range(k_steps):
        x, y, *rest = batches[step]
        x = x.to(dtype) if x.is_floating_point() else x
        for layer in layers.values():
            layer.records = []
        with groups_set(ref, groups):
            logits = ref(x)
        loss = cross_entropy(logits, y)
        for _, p in params:
            p.grad = None
        loss.backward()
        if step == 0:
            trace.logits, trace.loss = logits.detach().clone(), loss.detach().clone()
            trace.grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
        trace.stats.append({path: [dataclasses.replace(s, step=step) for s in layer.records] for path, layer in layers.items()})
        trace.order.append(rest[0].clone() if rest else torch.arange(len(y)))
        sgd_update_(params, state, lr, momentum, weight_decay)
    trace.weights = {n: p.detach().clone() for n, p in params}
    return trace
