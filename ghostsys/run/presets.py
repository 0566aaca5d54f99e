"""The papers' setups as presets: one flag fills every field the papers give, with its source.

Papers (in ``../shared/papers/``): **[A]** Dimitriou & Arandjelović, "A New Look at Ghost Normalization",
arXiv 2020; **[B]** the same authors, "Sequential Normalization: Embracing Smaller Sample Sizes for
Normalization", Information 13:337, 2022 (its Section 3 and Appendices B-C give the setups).

``launch/run.py --preset NAME`` fills the preset's fields; any flag given explicitly on the command
line wins; the resolved config is what is printed, saved (config.json) and what decides the run's
identity (the preset name itself is recorded but is not part of it). ``--preset list`` prints them.
Every value has a source: a section of a paper, a reference the paper defers to (Cubuk et al. for
CIFAR-100, NVIDIA's DeepLearningExamples recipe for ImageNet), or "unstated" with why this value.

Norm choice: every preset trains the papers' **BatchNorm baseline**, i.e. BatchNorm with
``G_M = n_g`` (each rank normalizes its own share): on one process that is full BatchNorm; the
papers' CIFAR-100 and ImageNet baselines ran on 8 GPUs, i.e. ``G_M = 8``: launch 8 ranks, or add
``--nfp 8`` on one. The papers' GhostNorm / SeqNorm results are listed as ``variants`` (flags for
one process: the papers' per-GPU ``G_M`` times their 8 GPUs, see [B] App. C).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ghostsys.run.config import ConfigError, RunConfig

__all__ = ["Preset", "PRESETS", "apply", "resolve", "explicit_fields", "describe"]

UNSTATED = "unstated in the papers"


@dataclass(frozen=True)
class Preset:
    """One setup of the papers: field values, each with its source, plus named variants and known gaps."""

    name: str
    summary: str
    values: Mapping[str, tuple[Any, str]]  # field -> (value, source)
    variants: Mapping[str, str] = field(default_factory=dict)  # name -> extra flags (one process)
    not_reproduced: Sequence[str] = ()

    def fields(self) -> dict[str, Any]:
        """The preset's field values."""
        return {k: v for k, (v, _) in self.values.items()}


_MNIST = Preset(
    "mnist-simplenet",
    "SimpleNet on MNIST, the loss-landscape experiment ([B] Section 3.1, App. B.1-B.2; [A] Section 3.1)",
    {
        "dataset": ("mnist", "[B] App. B.1"),
        "model": ("simplenet", "[B] App. B.1: two fully connected layers of 512 and 300, inputs as 784-vectors"),
        "batch_size": (512, "[B] App. B.1: batch size 512 on a single GPU"),
        "lr": (0.4, "[B] App. B.1: learning rate 0.4"),
        "schedule": ("constant", f"{UNSTATED}: one learning rate is given, no schedule"),
        "momentum": (0.0, f"{UNSTATED}: plain SGD assumed (only a learning rate is given)"),
        "weight_decay": (0.0, f"{UNSTATED}: none assumed"),
        "epochs": (20, f"{UNSTATED}: 20 chosen (Figs. 2 and A3 show the whole run, its length is not given)"),
        "augment": (False, "[B] App. B.1: inputs only normalized by the training set's mean and variance"),
        "eval_split": ("test", "[B] App. B.1: trained on the 60,000 training images, evaluated on the 10,000 test images"),
        "norm": ("batch", "[B] Section 3.1: BatchNorm vs GhostNorm vs no normalization (baseline)"),
        "landscape_lrs": ("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", "[B] App. B.2: loss at 8 learning rates 0.1 ... 0.8"),
        "landscape_every": (1, "[B] Section 3.1: at each step of updating the parameters"),
    },
    variants={
        "GhostNorm (best: G_M = 64, 8 samples per ghost batch, [B] App. B.3)": "--mode layer --norm ghost --ghost-groups 64",
        "no normalization (baseline)": "--norm none",
    },
)

_CIFAR10 = Preset(
    "cifar10-resnet56-onecycle",
    "ResNet-56 on CIFAR-10 with super-convergence, the loss-landscape experiment ([B] Section 3.1, App. B.1-B.2)",
    {
        "dataset": ("cifar10", "[B] App. B.1"),
        "model": ("resnet56", "[B] App. B.1: ResNet-56 (He et al.; option-A shortcuts, the CIFAR original)"),
        "batch_size": (512, "[B] Section 4: BatchNorm 'uses all 512 samples' with super-convergence on CIFAR-10"),
        "lr": (3.0, "[B] App. B.1: one cycle 0.1 -> 3.0 (peak)"),
        "schedule": ("onecycle", "[B] App. B.1: linear 0.1 -> 3.0 over 15 epochs, -> 0.1 over 15, -> 0.003 over the "
                                 "last 10 ([A] Section 3.1 says down to 0.0001; we follow [B])"),
        "epochs": (40, "[B] App. B.1: 15 + 15 + 10 epochs"),
        "momentum": (0.0, "[B] App. B.1: the optimizer does not employ any momentum"),
        "weight_decay": (1e-4, "[B] App. B.1: weight decay 0.0001"),
        "augment": (True, "[B] App. B.1: horizontal flips and pad-and-crop (pad 4 px: unstated, the usual CIFAR value)"),
        "cutout": (0, "[B] App. B.1: no Cutout in this experiment"),
        "eval_split": ("test", "[B] App. B.1: trained on the 50,000 training images, evaluated on the 10,000 test images"),
        "norm": ("batch", "[B] Section 3.1: BatchNorm vs GhostNorm (and no normalization)"),
        "landscape_lrs": ("x0.5,x1,x1.5,x2", "[B] App. B.2: 4 cyclical learning rates (0.05,1.5), (0.1,3), (0.15,4.5), "
                                            "(0.2,6) = 0.5, 1, 1.5, 2 x the one-cycle schedule"),
        "landscape_every": (1, "[B] Section 3.1: at each step of updating the parameters"),
    },
    variants={
        "GhostNorm G_M = 128 (4 samples per ghost batch, [B] Section 3.1/App. B.3)": "--mode layer --norm ghost --ghost-groups 128",
        "no normalization (needs the cycle (0.1, 1), [B] App. B.1)": "--norm none --lr 1",
    },
    not_reproduced=[
        "no-normalization baseline: [B] runs the cycle 0.1 -> 1; ghostsys' one-cycle shape scales with the peak "
        "(--lr 1 cycles 0.033 -> 1)",
    ],
)

_CUBUK = "Cubuk et al. (RandAugment), whose hyperparameters [B] App. C adopts"
_CIFAR100 = Preset(
    "cifar100-wrn28-10",
    "Wide-ResNet-28-10 on CIFAR-100, the SeqNorm experiment ([B] Section 3.2.1, App. C; [A] Section 3.2)",
    {
        "dataset": ("cifar100", "[B] App. C"),
        "model": ("wrn28_10", "[B] App. C: Wide-ResNet, depth 28, width 10; no dropout (it 'consistently worsens')"),
        "batch_size": (512, "[B] App. C: batch size increased from 128 to 512"),
        "lr": (0.4, f"[B] App. C: warm-up 'increases the initial learning rate by four times in 5 epochs' from the "
                    f"0.1 of {_CUBUK}"),
        "schedule": ("warmup_cosine", "[B] App. C: warm-up x4 over 5 epochs, then cosine"),
        "epochs": (200, "[B] App. C: 200 epochs"),
        "momentum": (0.9, f"{_CUBUK} (Nesterov or not is not stated; ghostsys' SGD uses plain momentum)"),
        "weight_decay": (5e-4, _CUBUK),
        "augment": (True, "[B] App. C: horizontal flips, pad-and-crop (4 px) and Cutout"),
        "cutout": (16, "size unstated in the papers: 16 px, the Cutout size of Cubuk et al.'s CIFAR code"),
        "eval_split": ("val", "[B] App. C: 45,000 train / 5,000 validation (stratified) / 10,000 test"),
        "norm": ("batch", "[B] App. C: BatchNorm baseline on 8 GPUs = G_M 8: launch 8 ranks, or --nfp 8 on one"),
    },
    variants={
        "BatchNorm as the paper ran it (8 GPUs, G_M = 8) on one process": "--nfp 8",
        "GhostNorm (best: G_M = 8 per GPU x 8 GPUs = 64, [B] Table 1)": "--mode layer --norm ghost --ghost-groups 64",
        "SeqNorm (best: G_C = 4, G_M = 8 per GPU x 8 = 64, [B] Table 1)": "--mode layer --norm seq --channel-groups 4 --ghost-groups 64",
        "Noisy BatchNorm (best std 3e-4, [B] App. C; on 8 ranks)": "--norm noisy --noise-std 3e-4",
    },
    not_reproduced=["RandAugment rows of [B] Table 1 (ghostsys has no RandAugment)"],
)

_NVIDIA = "NVIDIA DeepLearningExamples ConvNets recipe (20.08; [B] App. C adopts it, 8 GPUs x 256, AMP)"
_IMAGENET = Preset(
    "imagenet-resnet18",
    "ResNet-18 on ImageNet ([B] Section 3.2.3, App. C)",
    {
        "dataset": ("imagenet", "[B] App. C: 1.28M training images, evaluated on the 50,000 validation images"),
        "model": ("tv:resnet18", "[B] App. C: ResNet-18 v1.5 (torchvision's ResNet-18)"),
        "batch_size": (2048, f"{_NVIDIA}: 256 per GPU x 8 GPUs"),
        "lr": (2.048, f"{_NVIDIA}: 0.256 per 256 samples"),
        "schedule": ("nvidia_cosine", f"{_NVIDIA}: linear warm-up over 8 epochs, then cosine"),
        "epochs": (250, "[B] App. C: tuned with the 50-epoch script, final models with the 250-epoch one (--epochs 50 to tune)"),
        "momentum": (0.875, _NVIDIA),
        "weight_decay": (3.0517578125e-05, _NVIDIA),
        "grad_clip": (2.0, "[B] App. C: gradients clipped at threshold 2 (global L2 norm assumed)"),
        "augment": (True, f"{_NVIDIA}: random flips (its random-resized crop is replaced by ghostsys' 4-px pad-and-crop)"),
        "eval_split": ("val", "[B] App. C: the official validation set"),
        "norm": ("batch", "[B] App. C: BatchNorm baseline on 8 GPUs = G_M 8: launch 8 ranks, or --nfp 8 on one"),
    },
    variants={
        "GhostNorm (best: G_M = 4 per GPU x 8 = 32, [B] Section 3.2.3)": "--mode layer --norm ghost --ghost-groups 32",
        "SeqNorm (best: G_C = 4, G_M = 4 per GPU x 8 = 32, [B] Section 3.2.3)": "--mode layer --norm seq --channel-groups 4 --ghost-groups 32",
    },
    not_reproduced=[
        "mixed precision (AMP, static loss scale 128): add the run's mixed-precision flag where ghostsys has one",
        "label smoothing 0.1, mixup 0.2 (250-epoch script), fan-in init, DALI, random-resized crops",
        "the three ImageNetV2 test sets of [B] Table 2",
    ],
)

PRESETS: dict[str, Preset] = {p.name: p for p in (_MNIST, _CIFAR10, _CIFAR100, _IMAGENET)}


def _check_known(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)} "
                          "(--preset list shows them with their sources)")
    return PRESETS[name]


def apply(cfg: RunConfig, explicit: set[str] | frozenset[str] = frozenset()) -> RunConfig:
    """`cfg` with its preset's values filled in, except for the fields in `explicit` (flags the user gave)."""
    if not cfg.preset:
        return cfg
    preset = _check_known(cfg.preset)
    return cfg.replace(**{k: v for k, v in preset.fields().items() if k not in explicit})


def resolve(name: str, **overrides: Any) -> RunConfig:
    """The Python-side --preset: RunConfig of preset `name` with `overrides` winning."""
    return apply(RunConfig(preset=name, **overrides), set(overrides))


def explicit_fields(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations the user actually gave in `argv` (re-parsed with every default suppressed)."""
    saved = [(a, a.default) for a in parser._actions]  # argparse has no public API for this
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(given))


def _as_flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{name.replace('_', '-')}"
    return f"{flag} {value}"


def describe() -> str:
    """Every preset with each value and its source (what `--preset list` prints)."""
    defaults = RunConfig()
    lines = ["Presets of the papers' setups ([A] arXiv 2020 'A New Look at Ghost Normalization'; [B] Information 13:337, "
             "2022 'Sequential Normalization'). Explicit flags override any value.", ""]
    for p in PRESETS.values():
        lines.append(f"{p.name}: {p.summary}")
        for k, (v, src) in p.values.items():
            lines.append(f"  {_as_flag(k, v):<40} # {src}")
        rest = [f.name for f in dataclasses.fields(RunConfig) if f.name not in p.values]
        lines.append("  everything else: ghostsys defaults (" + ", ".join(
            f"{k}={getattr(defaults, k)}" for k in ("mode", "nfp", "seed", "dtype") if k in rest) + ", ...)")
        for what, flags in p.variants.items():
            lines.append(f"  variant: {what}:  {flags}")
        for gap in p.not_reproduced:
            lines.append(f"  not reproduced: {gap}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
