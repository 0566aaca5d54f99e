"""Models: shapes, structure, parameter counts, the norm factory, torchvision models with swapped norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ghostsys.nn.models import build_model, wide_resnet


def bn(c: int, d: int) -> nn.Module:
    return nn.BatchNorm1d(c) if d == 1 else nn.BatchNorm2d(c)


class Recorder:
    """A norm factory that records its calls and tags what it builds."""

    class Tagged(nn.BatchNorm2d):
        pass

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, c: int, d: int) -> nn.Module:
        self.calls.append((c, d))
        return nn.BatchNorm1d(c) if d == 1 else self.Tagged(c)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 28, 28), (3, 32, 32)])
def test_small_cnn_shapes(shape):
    rec = Recorder()
    model = build_model("cnn", num_classes=7, in_shape=shape, norm=rec)
    assert model(torch.randn(4, *shape)).shape == (4, 7)
    assert rec.calls == [(32, 2), (64, 2), (128, 2)]


def test_simplenet_structure():
    rec = Recorder()
    model = build_model("simplenet", num_classes=10, in_shape=(1, 28, 28), norm=rec)
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(784, 512), (512, 300), (300, 10)]
    assert rec.calls == [(512, 1), (300, 1)]
    kinds = [type(m).__name__ for m in model.net]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_resnet56_size_and_forward():
    rec = Recorder()
    model = build_model("resnet56", num_classes=10, in_shape=(3, 32, 32), norm=rec)
    assert n_params(model) == 853_018  # He et al.'s 0.85M with option A (parameter-free) shortcuts
    assert len(rec.calls) == 1 + 27 * 2 and {c for c, _ in rec.calls} == {16, 32, 64}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55  # 55 convolutions + 1 linear = 56 layers
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_resnet_depths_and_option_b():
    from ghostsys.nn.models import resnet56

    r20 = build_model("resnet20", num_classes=10, in_shape=(3, 32, 32), norm=bn)
    assert n_params(r20) == 269_722  # the 0.27M of He et al.
    b = resnet56((3, 32, 32), 10, bn, shortcut="B")
    assert n_params(b) > 853_018  # two 1x1 projections + their norms
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("resnet21", num_classes=10, in_shape=(3, 32, 32), norm=bn)


def test_tiny_wide_resnet_forward_backward():
    model = wide_resnet(10, 2, (3, 16, 16), 5, bn)
    out = model(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 5)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert widths == [16, 32, 32, 64, 64, 128, 128]


def test_wrn28_10_size():
    model = build_model("wrn28_10", num_classes=10, in_shape=(3, 32, 32), norm=bn)  # ~0.5 s, 146 MB
    assert 36.4e6 < n_params(model) < 36.6e6


def test_deterministic_init():
    torch.manual_seed(3)
    a = build_model("cnn", num_classes=10, in_shape=(3, 16, 16), norm=bn)
    torch.manual_seed(3)
    b = build_model("cnn", num_classes=10, in_shape=(3, 16, 16), norm=bn)
    torch.manual_seed(4)
    c = build_model("cnn", num_classes=10, in_shape=(3, 16, 16), norm=bn)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as e:
        build_model("vgg", num_classes=10, in_shape=(3, 32, 32), norm=bn)
    for name in ("cnn", "simplenet", "resnet56", "wrn28_10", "tv:"):
        assert name in str(e.value)


@pytest.mark.filterwarnings("ignore:torchvision's C\\+\\+ extension")
def test_torchvision_resnet18_with_all_norms_swapped():
    rec = Recorder()
    model = build_model("tv:resnet18", num_classes=10, in_shape=(3, 32, 32), norm=rec)
    found = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(found) == 20 and all(isinstance(m, Recorder.Tagged) for m in found)
    assert len(rec.calls) == 20 and all(d == 2 for _, d in rec.calls)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="torchvision"):
        build_model("tv:no_such_net", num_classes=10, in_shape=(3, 32, 32), norm=rec)
