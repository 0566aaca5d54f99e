"""`convert` and `convert_sync` on real timm and torchvision architectures never change what a model
computes apart from the normalization statistics; BatchNorm subclasses they cannot swap faithfully are
refused with their class and module path.

The models cover timm's BatchNormAct2d (ReLU, SiLU, hard-swish; with dropout inside the layer in one
case), squeeze-excitation, stochastic depth (drop_path), classifier dropout, BatchNorm with
eps/momentum other than the defaults, and BatchNorm(bias=False) (timm's resnet10t built with a
bias-free norm_layer: a real architecture with a real option of it).

Tolerance: none (bit equality). With one ghost group GhostBatchNorm makes the very F.batch_norm call
BatchNorm makes, with the same tensors and arguments, in training and in eval; every other layer is
the same module object; timm's BatchNormAct2d does F.batch_norm, drop, act, which the converted layer
does too. The CPU kernels are deterministic for a given shape and thread count, and dropout and
drop-path draw the same numbers from the same seeded generator in the same order. So any difference
at all means the converted model computes something else. Negative control: four ghost groups in
training must change the output by more than 1e-3 relative.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ghostsys._compat import import_torchvision
from ghostsys.nn import GhostBatchNorm, SyncBatchNorm, UnconvertibleNormError, convert, convert_sync
from ghostsys.nn.swap import DropAct, GhostBatchNormAct, SyncBatchNormAct

EXACT = dict(rtol=0.0, atol=0.0)
BATCH, SIZE = 8, 32  # 8 samples so that four ghost groups of 2 stay legal where the maps shrink to 1x1

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the CPU-torch shim's RuntimeWarning, if the .pth hook did not run
    tv = import_torchvision()
    import timm
    from timm.layers import BatchNormAct2d, convert_splitbn_model

# name -> builder; each a randomly initialized real architecture (small input: 8 x 3 x 32 x 32).
MODELS = {
    "timm:efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10, drop_rate=0.3,
                                                      drop_path_rate=0.2),
    "timm:mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100", num_classes=10, drop_rate=0.3),
    "timm:regnety_002": lambda: timm.create_model("regnety_002", num_classes=10, drop_path_rate=0.2),
    "timm:resnet10t(bias=False)": lambda: timm.create_model(
        "resnet10t", num_classes=10, drop_rate=0.3, drop_path_rate=0.2,
        norm_layer=functools.partial(nn.BatchNorm2d, bias=False)),
    "tv:resnet18": lambda: tv.models.resnet18(num_classes=10),
    "tv:mobilenet_v3_small": lambda: tv.models.mobilenet_v3_small(num_classes=10),
    "tv:efficientnet_b0": lambda: tv.models.efficientnet_b0(num_classes=10),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: on a busy 2-core machine OpenMP's spin-waiting costs more than the work."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial affine and running statistics, so that eval really uses them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(5)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0, 0.5, generator=gen)
    return model


def _train_forward(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """Train-mode output, parameter gradients and buffers after one forward/backward under a fixed seed."""
    model.train()
    torch.manual_seed(seed)
    y = model(x)
    y.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return y.detach(), grads


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", params=list(MODELS))
def original(request) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    return request.param, _randomize_norms(MODELS[request.param](), seed=1).eval()


def test_convert_with_one_group_is_the_same_model(original):
    name, model = original
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    ghost = convert(copy.deepcopy(model), "ghost", ghost_groups=1)

    n_bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    assert n_bn and not any(isinstance(m, _BatchNorm) for m in ghost.modules())
    assert sum(isinstance(m, GhostBatchNorm) for m in ghost.modules()) == n_bn
    assert _count(ghost) == _count(model), "convert added or dropped parameters"
    assert [(k, v.shape) for k, v in ghost.state_dict().items()] == [(k, v.shape) for k, v in model.state_dict().items()]
    if "bias=False" in name:
        assert ghost.bn1.bias is None and "bn1.bias" not in ghost.state_dict()
    n_act = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert sum(isinstance(m, GhostBatchNormAct) for m in ghost.modules()) == n_act  # drop and act kept

    with torch.no_grad():
        torch.testing.assert_close(ghost.eval()(x), model.eval()(x), **EXACT)

    reference = copy.deepcopy(model)  # train mode updates the buffers: compare from the same start
    want, want_grads = _train_forward(reference, x, seed=3)
    got, got_grads = _train_forward(ghost, x, seed=3)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(got_grads, want_grads, **EXACT)
    torch.testing.assert_close(dict(ghost.named_buffers()), dict(reference.named_buffers()), **EXACT)

    control = convert(copy.deepcopy(model), "ghost", ghost_groups=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ghost batches of 2 samples: warned, and meant
        differs, _ = _train_forward(control, x, seed=3)
    assert (differs - want).abs().max() > 1e-3 * want.abs().max(), "four ghost groups must change the output"


def test_convert_sync_keeps_drop_act_and_the_function(original):
    name, model = original
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    synced = convert_sync(copy.deepcopy(model))
    assert not any(type(m) in (nn.BatchNorm2d, BatchNormAct2d) for m in synced.modules())
    n_act = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert sum(type(m) is SyncBatchNormAct for m in synced.modules()) == n_act
    assert _count(synced) == _count(model) and list(synced.state_dict()) == list(model.state_dict())
    # No process group: ghostsys' SyncBatchNorm is BatchNorm on one process; timm's own conversion
    # would have made SyncBatchNormAct layers that refuse CPU tensors.
    with torch.no_grad():
        torch.testing.assert_close(synced.eval()(x), model.eval()(x), **EXACT)
    reference = copy.deepcopy(model)
    want, _ = _train_forward(reference, x, seed=5)
    got, _ = _train_forward(synced, x, seed=5)
    torch.testing.assert_close(got, want, **EXACT)


def test_act_and_drop_are_the_original_modules_for_every_kind():
    drop = nn.Dropout(0.5)
    bn = BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=lambda: drop)
    kinds = {"batch": {}, "ghost": {"ghost_groups": 2}, "seq": {"channel_groups": 2, "ghost_groups": 1},
             "group": {"channel_groups": 2}, "noisy": {"noise_std": 0.1}, "none": {}}
    x = torch.randn(4, 4, 3, 3)
    for kind, kw in kinds.items():
        new = convert(copy.deepcopy(nn.Sequential(bn)), kind, **kw)[0]
        assert type(new.act) is nn.SiLU and type(new.drop) is nn.Dropout, kind
        assert sorted(n for n, _ in new.named_children()) == ["act", "drop"], kind
        new.eval()  # eval: dropout off; the activation must still be applied
        assert (new(x) >= -0.2785).all(), kind  # SiLU's minimum is -0.2785: the act ran
    assert type(convert(nn.Sequential(bn), "none")[0]) is DropAct


class _Scaled(nn.BatchNorm2d):
    """A BatchNorm subclass that adds behaviour: it must never be converted silently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _NoBias(nn.BatchNorm2d):
    """Only changes __init__: converted as the BatchNorm it is."""

    def __init__(self, c: int) -> None:
        super().__init__(c, eps=1e-3, bias=False)


def test_unknown_batchnorm_subclass_is_refused_with_class_and_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1), _Scaled(4)))
    before = copy.deepcopy(model)
    with pytest.raises(UnconvertibleNormError) as err:
        convert(model, "ghost", ghost_groups=1)
    msg = str(err.value)
    assert "_Scaled at 2.1" in msg and "forward" in msg
    assert "\n" not in msg  # one error, one line
    assert type(model[1]) is nn.BatchNorm2d  # nothing swapped before the refusal
    with pytest.raises(UnconvertibleNormError, match="_Scaled at 2.1"):
        convert_sync(before)

    # timm's SplitBatchNorm2d (auxiliary BatchNorms per batch split) in a real model: refused, every path named.
    split = convert_splitbn_model(timm.create_model("test_efficientnet"), num_splits=2)
    with pytest.raises(UnconvertibleNormError) as err:
        convert(split, "ghost", ghost_groups=2)
    assert "SplitBatchNorm2d at bn1, blocks.0.0.bn1" in str(err.value) and "more)" in str(err.value)


def test_hooks_lazy_and_init_only_subclasses():
    hooked = nn.BatchNorm2d(3)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(UnconvertibleNormError, match="forward hooks"):
        convert(nn.Sequential(hooked), "ghost", ghost_groups=1)
    with pytest.raises(UnconvertibleNormError, match="lazy"):
        convert(nn.Sequential(nn.LazyBatchNorm2d()), "ghost", ghost_groups=1)
    out = convert(nn.Sequential(_NoBias(3)), "ghost", ghost_groups=1)[0]
    assert type(out) is GhostBatchNorm and out.bias is None and out.eps == 1e-3


def test_convert_sync_of_plain_and_already_synced_layers():
    model = nn.Sequential(nn.BatchNorm1d(3, bias=False), SyncBatchNorm(3))
    kept = model[1]
    out = convert_sync(model)
    assert type(out[0]) is SyncBatchNorm and out[0].bias is None and out[1] is kept
