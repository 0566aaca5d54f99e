"""Models of the papers, each built around an explicit norm factory.

Model sources: the papers' models here, ``tv:<name>`` (torchvision) and ``timm:<name>`` (timm), both
randomly initialized, their BatchNorm layers swapped through ``ghostsys.nn.swap.replace_batchnorm``.
Models never read rank, device, env vars or any global config: the norm layer comes in as a
`NormFactory`, called `norm(num_features, dim)` with dim=1 for (M, C) features and dim=2 for
images (3 for volumes, only through torchvision models). Initialization uses the global torch RNG
only, so `torch.manual_seed(s)` before `build_model` fixes the weights.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int, int], nn.Module]

MODEL_NAMES = ("cnn", "simplenet", "resnet56", "wrn28_10", "resnet<6n+2> (e.g. resnet20)",
               "wrn<depth>_<width> (depth = 6n+4)", "tv:<torchvision model name> (e.g. tv:resnet18)",
               "timm:<timm model name> (e.g. timm:efficientnet_b0)")


def batchnorm(num_features: int, dim: int) -> nn.Module:
    """The plain BatchNorm factory (BatchNorm1d for dim=1, 2d for dim=2, 3d for dim=3)."""
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](num_features)


def _init(model: nn.Module) -> nn.Module:
    # He init for convs as in the ResNet / WRN papers; norm layers keep their own init.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


class SmallCNN(nn.Module):
    """Default model: three conv3x3-norm-ReLU stages (32, 64, 128; pool after the first two), GAP, linear."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_shape[0]
        for i, c_out in enumerate((32, 64, 128)):
            # No conv bias: the norm's shift makes it redundant.
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out, 2), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class SimpleNet(nn.Module):
    """The papers' MNIST MLP: flatten → 512 → norm → ReLU → 300 → norm → ReLU → classes."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(in_shape), 512), norm(512, 1), nn.ReLU(inplace=True),
            nn.Linear(512, 300), norm(300, 1), nn.ReLU(inplace=True),
            nn.Linear(300, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch (any input shape; flattened)."""
        return self.net(x)


class BasicBlock(nn.Module):
    """CIFAR ResNet block (post-activation); shortcut 'A' = parameter-free zero-padded identity, 'B' = 1x1 conv + norm."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out, 2)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out, 2)
        self.pad = 0
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.pad = c_out - c_in
                self.shortcut = nn.Identity()
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out, 2))
        self.stride, self.option = stride, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:  # option A: subsample, then zero-pad the new channels on both sides
            sc = x[:, :, :: self.stride, :: self.stride]
            sc = F.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            sc = self.shortcut(x)
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: conv16, 3 stages × n basic blocks (16/32/64 channels), GAP, linear."""

    def __init__(self, depth: int, in_shape: tuple[int, ...], num_classes: int, norm: NormFactory,
                 shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False), norm(16, 2), nn.ReLU(inplace=True))
        blocks, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, norm, shortcut))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation wide block: norm-ReLU-conv3x3-norm-ReLU-(dropout)-conv3x3, 1x1 conv shortcut on shape change."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = norm(c_in, 2), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = norm(c_out, 2), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        o = F.relu(self.bn1(x))
        # As in the WRN reference code, the projection shortcut takes the pre-activated input.
        sc = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + sc


class WideResNet(nn.Module):
    """Zagoruyko & Komodakis' WRN-depth-width: 3 stages of (depth-4)/6 wide blocks, 16k/32k/64k channels."""

    def __init__(self, depth: int, width: int, in_shape: tuple[int, ...], num_classes: int, norm: NormFactory,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"Wide-ResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)
        blocks, c_in = [], 16
        for stage, c_out in enumerate((16 * width, 32 * width, 64 * width)):
            for b in range(n):
                blocks.append(WideBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1, norm, dropout))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = norm(c_in, 2)
        self.fc = nn.Linear(c_in, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet56(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 for CIFAR (option A shortcuts by default: 0.85M parameters, as in He et al.)."""
    return CifarResNet(56, in_shape, num_classes, norm, shortcut)


def wide_resnet(depth: int, width: int, in_shape: tuple[int, ...], num_classes: int, norm: NormFactory,
                dropout: float = 0.0) -> WideResNet:
    """Wide-ResNet of any depth 6n+4 and width k."""
    return WideResNet(depth, width, in_shape, num_classes, norm, dropout)


def wrn28_10(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 (36.5M parameters), the papers' CIFAR model."""
    return WideResNet(28, 10, in_shape, num_classes, norm, dropout)


def _batchnorm_factory(norm: NormFactory) -> Callable[[nn.Module], nn.Module]:
    dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}

    def factory(bn: nn.Module) -> nn.Module:
        # Anything else (e.g. SyncBatchNorm) is treated as an image norm.
        dim = next((d for cls, d in dims.items() if isinstance(bn, cls)), 2)
        return norm(bn.num_features, dim)

    return factory


def _unknown(source: str, name: str, names: list[str], how: str) -> ValueError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" (close: {', '.join(f'{source}:{c}' for c in close)})" if close else ""
    return ValueError(f"--model {source}:{name}: no such {'timm' if source == 'timm' else 'torchvision'} "
                      f"model{hint}; list the valid names with {how}")


_TV_LIST = "`python -c \"import torchvision; print(torchvision.models.list_models())\"`"
_TIMM_LIST = "`python -c \"import timm; print(timm.list_models())\"`"


def _import_timm():
    from ghostsys._compat import import_torchvision

    import_torchvision()  # timm imports torchvision: make it importable on a CPU torch first
    import timm

    return timm


def check_model_name(name: str) -> None:
    """ValueError naming ``--model`` and how to list the valid names unless `name` names a model (nothing built)."""
    if name.startswith("tv:"):
        from ghostsys._compat import import_torchvision

        names = import_torchvision().models.list_models()
        if name[3:] not in names:
            raise _unknown("tv", name[3:], names, _TV_LIST)
    elif name.startswith("timm:"):
        timm = _import_timm()
        if not timm.is_model(name[5:]):
            raise _unknown("timm", name[5:], timm.list_models(), _TIMM_LIST)
    elif m := re.fullmatch(r"resnet(\d+)", name):
        if (int(m.group(1)) - 2) % 6 or int(m.group(1)) < 8:
            raise ValueError(f"--model {name}: CIFAR ResNet depth must be 6n+2 (resnet20, resnet32, resnet44, "
                             "resnet56, resnet110, ...)")
    elif m := re.fullmatch(r"wrn(\d+)_(\d+)", name):
        if (int(m.group(1)) - 4) % 6 or int(m.group(1)) < 10 or int(m.group(2)) < 1:
            raise ValueError(f"--model {name}: Wide-ResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...) and width "
                             ">= 1, e.g. wrn28_10")
    elif name not in ("cnn", "simplenet"):
        raise ValueError(f"--model {name!r} is unknown; valid choices: {', '.join(MODEL_NAMES)}")


def torchvision_model(name: str, num_classes: int, norm: NormFactory) -> nn.Module:
    """A randomly initialized torchvision model whose every BatchNorm is replaced through `norm`
    (a BatchNorm subclass with extra behaviour keeps it or is refused: ghostsys.nn.swap)."""
    from ghostsys.nn.swap import replace_batchnorm  # lazy: only this branch needs it

    check_model_name(f"tv:{name}")
    from ghostsys._compat import import_torchvision

    model = import_torchvision().models.get_model(name, weights=None, num_classes=num_classes)
    return replace_batchnorm(model, _batchnorm_factory(norm))


def timm_model(name: str, num_classes: int, in_chans: int, norm: NormFactory) -> nn.Module:
    """A randomly initialized timm model (its own default drop rates) with every BatchNorm replaced through
    `norm`; timm's BatchNormAct2d layers keep their drop and act (ghostsys.nn.swap)."""
    from ghostsys.nn.swap import replace_batchnorm  # lazy: only this branch needs it

    check_model_name(f"timm:{name}")
    model = _import_timm().create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    return replace_batchnorm(model, _batchnorm_factory(norm))


def build_model(name: str, *, num_classes: int, in_shape: tuple[int, ...], norm: NormFactory) -> nn.Module:
    """Build a model by name (see MODEL_NAMES) with its norm layers made by `norm`."""
    in_shape = tuple(in_shape)
    check_model_name(name)
    if name == "cnn":
        return SmallCNN(in_shape, num_classes, norm)
    if name == "simplenet":
        return SimpleNet(in_shape, num_classes, norm)
    if name.startswith("tv:"):
        return torchvision_model(name[3:], num_classes, norm)
    if name.startswith("timm:"):
        return timm_model(name[5:], num_classes, in_shape[0], norm)
    if m := re.fullmatch(r"resnet(\d+)", name):
        return CifarResNet(int(m.group(1)), in_shape, num_classes, norm)
    if m := re.fullmatch(r"wrn(\d+)_(\d+)", name):
        return WideResNet(int(m.group(1)), int(m.group(2)), in_shape, num_classes, norm)
    raise ValueError(f"--model {name!r} is unknown; valid choices: {', '.join(MODEL_NAMES)}")
