"""Put ghostsys' norm layers into any model without changing what it computes, apart from the statistics.

``replace_batchnorm(model, factory)`` swaps every BatchNorm layer for ``factory(bn)``;
``convert(model, kind, **kw)`` does it with ``make_norm`` and carries each layer's state over. Before
anything is swapped every BatchNorm of the model is sorted into one of three cases:

* **plain**: ``nn.BatchNorm{1,2,3}d``, ``nn.SyncBatchNorm``, ghostsys' ``SyncBatchNorm``, and
  subclasses of them that only change ``__init__`` (no other method or attribute on the class, no
  extra parameter, buffer or child module, nothing patched on the instance): swapped as they are.
* **norm + drop + act**: timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` (and ghostsys' own
  ``*Act`` layers below), whose forward is "batch norm, then ``self.drop``, then ``self.act``":
  swapped for the Act variant of the new layer, which keeps the same ``drop`` and ``act`` modules
  and applies them the same way -- what timm's own ``convert_sync_batchnorm`` does.
* anything else (a subclass that overrides ``forward`` or adds state, a layer with hooks or
  parametrizations, an uninitialized lazy BatchNorm): refused with ONE ``UnconvertibleNormError``
  naming each class and module path, and the model is left untouched.

State-dict keys of every swapped layer are the original's (``drop``/``act`` stay children of the
same names), so checkpoints interchange; ``bias=False`` stays bias-free.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ghostsys.nn.norms import GhostBatchNorm, NoisyBatchNorm, SeqNorm, make_norm
from ghostsys.nn.syncbn import SyncBatchNorm

__all__ = ["replace_batchnorm", "convert", "UnconvertibleNormError", "post_norm_modules", "DropAct",
           "GhostBatchNormAct", "SeqNormAct", "NoisyBatchNormAct", "BatchNorm1dAct", "BatchNorm2dAct",
           "BatchNorm3dAct", "GroupNormAct", "SyncBatchNormAct"]

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, SyncBatchNorm)
_BN_STATE = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
# What a class body defines when it only changes __init__ (Python adds the dunders by itself).
_INERT_CLASS_ATTRS = frozenset({"__init__", "__module__", "__qualname__", "__doc__", "__annotations__", "__dict__",
                                "__weakref__", "__firstlineno__", "__static_attributes__", "__orig_bases__",
                                "__parameters__", "__annotate_func__", "__annotations_cache__"})
_POST = ("drop", "act")  # the children a norm + drop + act layer applies after normalizing, in this order


class UnconvertibleNormError(ValueError):
    """A BatchNorm layer that cannot be swapped without changing what the model computes."""


# --- the norm + drop + act variants of every layer a swap can produce ---------------------------------

class _DropActMixin:
    """After the norm, ``self.drop`` then ``self.act`` -- timm's BatchNormAct2d contract."""

    drop: nn.Module
    act: nn.Module

    def forward(self, input: Tensor) -> Tensor:
        """Normalize as the base layer does, then apply drop and act."""
        return self.act(self.drop(super().forward(input)))  # type: ignore[misc]


class GhostBatchNormAct(_DropActMixin, GhostBatchNorm):
    """GhostBatchNorm, then ``drop`` and ``act`` (what a timm BatchNormAct2d becomes)."""


class SeqNormAct(_DropActMixin, SeqNorm):
    """SeqNorm, then ``drop`` and ``act``."""


class NoisyBatchNormAct(_DropActMixin, NoisyBatchNorm):
    """NoisyBatchNorm, then ``drop`` and ``act``."""


class BatchNorm1dAct(_DropActMixin, nn.BatchNorm1d):
    """BatchNorm1d, then ``drop`` and ``act``."""


class BatchNorm2dAct(_DropActMixin, nn.BatchNorm2d):
    """BatchNorm2d, then ``drop`` and ``act``."""


class BatchNorm3dAct(_DropActMixin, nn.BatchNorm3d):
    """BatchNorm3d, then ``drop`` and ``act``."""


class GroupNormAct(_DropActMixin, nn.GroupNorm):
    """GroupNorm, then ``drop`` and ``act``."""


class SyncBatchNormAct(_DropActMixin, SyncBatchNorm):
    """ghostsys' SyncBatchNorm, then ``drop`` and ``act`` (timm's SyncBatchNormAct, also on CPU/gloo)."""


class DropAct(nn.Module):
    """No normalization, only ``drop`` then ``act`` (what norm kind ``none`` leaves of a BatchNormAct2d)."""

    def __init__(self, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        """drop, then act."""
        return self.act(self.drop(input))


_ACT_VARIANT: dict[type, type] = {
    GhostBatchNorm: GhostBatchNormAct, SeqNorm: SeqNormAct, NoisyBatchNorm: NoisyBatchNormAct,
    nn.BatchNorm1d: BatchNorm1dAct, nn.BatchNorm2d: BatchNorm2dAct, nn.BatchNorm3d: BatchNorm3dAct,
    nn.GroupNorm: GroupNormAct, SyncBatchNorm: SyncBatchNormAct,
}


def _drop_act_types() -> tuple[type, ...]:
    """Classes whose forward is exactly norm, then self.drop, then self.act (exact types, not subclasses)."""
    ours: tuple[type, ...] = tuple(_ACT_VARIANT.values())
    # timm's, read from timm/layers/norm_act.py (BatchNormAct2d.forward: F.batch_norm, drop, act;
    # SyncBatchNormAct: SyncBatchNorm.forward, then drop and act when present). A model holding one
    # has imported timm already, so timm is never imported here.
    timm = sys.modules.get("timm.layers.norm_act")
    theirs = tuple(getattr(timm, n) for n in ("BatchNormAct2d", "SyncBatchNormAct") if hasattr(timm, n))
    return ours + theirs


def post_norm_modules(m: nn.Module) -> list[nn.Module]:
    """The modules a norm layer applies after normalizing ([drop, act] for norm + drop + act layers, else [])."""
    if type(m) in _drop_act_types():
        # timm's SyncBatchNormAct applies each only when present; a missing one is the identity.
        return [m._modules[name] if m._modules.get(name) is not None else nn.Identity() for name in _POST]
    return []


# --- sorting BatchNorm layers: plain, norm + drop + act, or refused --------------------------------------

def _problem(m: _BatchNorm, drop_act: tuple[type, ...]) -> str:
    """Why swapping m would change what the model computes ('' when it would not)."""
    cls = type(m)
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[operator]
        return "is a lazy BatchNorm that has not seen an input yet (run one forward pass first)"
    hooks = [k for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(m, k, None)]
    if hooks:
        return f"has {', '.join(h.strip('_').replace('_', ' ') for h in hooks)} registered on it"
    patched = sorted(k for k in ("forward", "_check_input_dim") if k in vars(m))
    if patched:
        return f"has {', '.join(patched)} replaced on the instance"
    extra_state = sorted((set(m._parameters) | set(m._buffers)) - _BN_STATE)
    if extra_state:
        return f"holds parameters/buffers a BatchNorm does not have ({', '.join(extra_state)})"
    children = set(m._modules)
    if cls in drop_act:
        return "" if children <= set(_POST) else f"has child modules besides drop/act ({', '.join(sorted(children))})"
    if children:
        return f"has child modules ({', '.join(sorted(children))}) that its forward may apply"
    for klass in cls.__mro__:
        if klass in _PLAIN:
            return ""
        defined = sorted(set(vars(klass)) - _INERT_CLASS_ATTRS)
        if defined:
            return f"defines {', '.join(defined)} (only subclasses that change __init__ alone are converted)"
    return "is not a BatchNorm{1,2,3}d or SyncBatchNorm subclass"


def _describe(problems: dict[tuple[type, str], list[str]]) -> str:
    parts = []
    for (cls, why), paths in problems.items():
        shown = ", ".join(paths[:4]) + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else "")
        parts.append(f"{cls.__module__}.{cls.__qualname__} at {shown} {why}")
    return ("cannot swap these norm layers without changing what the model computes: " + "; ".join(parts)
            + ". Swapped are nn.BatchNorm{1,2,3}d, SyncBatchNorm, their subclasses that only change __init__, "
            "and timm's BatchNormAct2d family (drop and act kept); replace the others in the model first.")


def _check_convertible(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm of model with its first path; UnconvertibleNormError naming all refused ones."""
    drop_act = _drop_act_types()
    found: dict[int, tuple[str, _BatchNorm]] = {}
    problems: dict[tuple[type, str], list[str]] = defaultdict(list)
    for path, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, _BatchNorm) or id(m) in found:
            continue
        found[id(m)] = (path, m)
        why = _problem(m, drop_act)
        if why:
            problems[(type(m), why)].append(path or "(the model itself)")
    if problems:
        raise UnconvertibleNormError(_describe(problems))
    return list(found.values())


def _keep_drop_act(new: nn.Module, old: nn.Module) -> nn.Module:
    """new, turned into its Act variant applying old's own drop and act modules."""
    drop, act = post_norm_modules(old)
    if type(new) is nn.Identity:
        return DropAct(drop, act)
    variant = _ACT_VARIANT.get(type(new))
    if variant is None:
        raise UnconvertibleNormError(
            f"{type(old).__name__} applies drop and act after normalizing, and its replacement "
            f"{type(new).__name__} has no variant that keeps them; replace it with one of "
            f"{', '.join(sorted(t.__name__ for t in _ACT_VARIANT))}")
    new.__class__ = variant  # the variant adds a forward and nothing else: same state, same keys
    new.drop, new.act = drop, act
    return new


def replace_batchnorm(model: nn.Module, factory: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    """Replace every BatchNorm submodule by factory(old), recursively and in place; returns the model
    (or the replacement when the model itself is one).

    Every BatchNorm is checked first (module docstring): if any cannot be swapped faithfully, ONE
    UnconvertibleNormError names them all and nothing is changed. A norm + drop + act layer becomes
    the Act variant of factory's layer, keeping its drop and act. A BatchNorm shared by several
    parents is replaced by one shared new module; factory may return its argument to keep it.
    """
    targets = _check_convertible(model)
    memo: dict[int, nn.Module] = {}
    for _, bn in targets:
        new = factory(bn)
        if new is not bn and post_norm_modules(bn):
            new = _keep_drop_act(new, bn)
        memo[id(bn)] = new
    if id(model) in memo:
        return memo[id(model)]
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter skips a child seen twice (shared modules).
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in memo and memo[id(child)] is not child:
                setattr(parent, name, memo[id(child)])
    return model


def _bn_dim(bn: _BatchNorm) -> int:
    # SyncBatchNorm accepts any rank; image models are its common case.
    return next((d for d, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d))
                 if isinstance(bn, cls)), 2)


def convert(model: nn.Module, kind: str, **kw) -> nn.Module:
    """Swap every BatchNorm of `model` (in place) for make_norm(kind, ...), carrying over its state.

    eps / momentum / affine / bias / track_running_stats come from each BatchNorm unless given in kw
    (``dim`` likewise, from the BatchNorm class). weight, bias, running_mean, running_var and
    num_batches_tracked are copied where the new layer has them -- for GroupNorm and SeqNorm only the
    affine, since their statistics are of a different quantity. Device, dtype, requires_grad and
    train/eval mode are kept; so are the drop and act of timm's BatchNormAct2d family. A BatchNorm
    that cannot be swapped faithfully raises UnconvertibleNormError (see replace_batchnorm).
    """

    def factory(bn: _BatchNorm) -> nn.Module:
        args = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine, "bias": bn.bias is not None or not bn.affine,
                "track_running_stats": bn.track_running_stats, **kw}
        args.setdefault("dim", _bn_dim(bn))
        new = make_norm(kind, bn.num_features, **args)
        ref = next((t for t in [*bn.parameters(recurse=False), *bn.buffers(recurse=False)] if t.is_floating_point()),
                   None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        names = ["weight", "bias"]
        if kind not in ("seq", "group"):
            names += ["running_mean", "running_var", "num_batches_tracked"]
        with torch.no_grad():
            for name in names:
                src, dst = getattr(bn, name, None), getattr(new, name, None)
                if isinstance(src, Tensor) and isinstance(dst, Tensor) and src.shape == dst.shape:
                    dst.copy_(src)
                    if isinstance(dst, nn.Parameter):
                        dst.requires_grad_(src.requires_grad)
        return new.train(bn.training)

    return replace_batchnorm(model, factory)
