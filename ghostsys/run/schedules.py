"""Learning-rate schedules of the papers, as multipliers of the peak --lr over optimizer steps."""

from __future__ import annotations

import math
from typing import Callable

import torch


def onecycle(frac: float) -> float:
    """Super-convergence shape (Smith & Topin; papers' ResNet-56): 0.1 -> 3 over 15/40 of training,
    back to 0.1 over the next 15/40, then down to 0.003 over the last 10/40 (relative to peak 3)."""
    lo, end = 0.1 / 3.0, 0.003 / 3.0
    if frac < 15 / 40:
        return lo + (1 - lo) * frac / (15 / 40)
    if frac < 30 / 40:
        return 1 - (1 - lo) * (frac - 15 / 40) / (15 / 40)
    return lo - (lo - end) * min(1.0, (frac - 30 / 40) / (10 / 40))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Goyal et al. warm-up: from peak/4 up to peak over `warmup` steps, then cosine to 0."""
    if step < warmup:
        return 0.25 + 0.75 * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def linear_warmup_cosine(step: int, total: int, warmup: int) -> float:
    """NVIDIA DeepLearningExamples ConvNets recipe: linear warm-up to the peak over `warmup` steps (reaching it
    at the last warm-up step, as their (epoch + 1) / warmup), then cosine to 0. They step it per epoch; we per step."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_schedule(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR for 'constant', 'onecycle', 'warmup_cosine' (5 epochs of warm-up) or 'nvidia_cosine' (8 epochs);
    a warm-up never takes more than 1/4 of the run."""
    warmup = max(1, min(5 * steps_per_epoch, total_steps // 4))
    warmup8 = max(1, min(8 * steps_per_epoch, total_steps // 4))
    fns: dict[str, Callable[[int], float]] = {
        "constant": lambda step: 1.0,
        "onecycle": lambda step: onecycle(step / max(1, total_steps)),
        "warmup_cosine": lambda step: warmup_cosine(step, total_steps, warmup),
        "nvidia_cosine": lambda step: linear_warmup_cosine(step, total_steps, warmup8),
    }
    if name not in fns:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(fns)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns[name])
