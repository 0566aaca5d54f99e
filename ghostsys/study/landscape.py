"""The loss-landscape probe of Santurkar et al. (2018), as the papers use it ([B] Section 3.1, App. B.2).

At a chosen step, after the step's backward passes and before the optimizer update, the probe walks
along the gradient: for every step size eta it measures the training loss at ``theta - eta * g`` on
the step's own batch, and records the minimum and the maximum. A narrow band means the gradient is
predictive (a smooth landscape); a wide one means it is not.

What ``g`` is: each parameter's ``.grad`` after the step's backward passes, i.e. the gradient of the
mean loss over the global batch M, already averaged over ranks (DDP all-reduces it in the last
backward, DeepSpeed ZeRO-0 at its accumulation boundary) and summed over the n_fp micro-batches.
It is the raw gradient: **no weight decay, no momentum, no clipping**. Santurkar et al. probe "the
gradient direction" to measure how predictive the gradient itself is (the landscape's Lipschitz
and smoothness properties); adding the optimizer's momentum buffer or decay term would measure the
optimizer's trajectory instead and would make the band depend on optimizer state rather than on
the landscape. Clipping only rescales g, i.e. relabels the step sizes.

The loss at each point is the training loss as the step computed it: the model stays in training
mode, every micro-batch of this rank goes through its own forward (so each ghost group normalizes
exactly the samples it normalized in training: explicit layer groups, accumulation micro-batches,
unsynced ranks, SyncBN groups), and the global mean over all ranks' samples comes from one
``(sum, count)`` all-reduce of every step size at once.

It must not disturb training, and does not:
- forward runs on the unwrapped module (no DDP hooks: no buffer broadcast, no gradient reducer state);
- under ``torch.no_grad`` (``.grad`` untouched), parameters are restored bit-exactly from a copy;
- BatchNorm buffers (running mean/var, num_batches_tracked) are copied back afterwards;
- torch's CPU (and CUDA) RNG state is restored, so NoisyBatchNorm's noise in training is unchanged
  (every step size sees the same noise draw, the one training would have drawn next);
- the optimizer and its state are never touched.
DeepSpeed ZeRO 1/2 keep the reduced gradient in partitioned buffers, not in ``.grad``: the config
refuses ``--landscape-lrs`` there (use ZeRO 0 or Accelerate). Costs: one copy of the parameters,
``len(etas) * n_fp`` forward passes per probed step.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ghostsys.run import dist
from ghostsys.run.config import ConfigError
from ghostsys.run.train import Callback, Setup

__all__ = ["LandscapeProbe", "probe_losses"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@torch.no_grad()
def probe_losses(model: nn.Module, batches: Sequence[Batch], etas: Sequence[float]) -> torch.Tensor:
    """Global mean loss over `batches` (this rank's) and all ranks at theta - eta * grad, for every eta (float64).

    Leaves parameters, gradients, buffers and the RNG state exactly as it found them.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        raise ConfigError("the landscape probe found no gradients in .grad (DeepSpeed ZeRO 1/2 keep them partitioned): "
                          "use --zero-stage 0 or --engine accelerate, or drop --landscape-lrs")
    device = params[0].device
    theta = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = _rng_state(device)
    sums = torch.zeros(len(etas), dtype=torch.float64, device=device)
    count = sum(len(y) for _, y in batches)
    try:
        for k, eta in enumerate(etas):
            for p, t in zip(params, theta):
                p.copy_(t).add_(p.grad, alpha=-eta)  # the form of SGD's update p - lr * g
            _set_rng_state(rng, device)
            for x, y in batches:
                sums[k] += F.cross_entropy(model(x), y, reduction="sum").double()
    finally:
        for p, t in zip(params, theta):
            p.copy_(t)
        for b, keep in buffers:
            b.copy_(keep)
        _set_rng_state(rng, device)
    total, n = dist.sum_count(sums, count)
    return total / n


class LandscapeProbe(Callback):
    """Before the update of every `every`-th step: the loss at theta - eta*g for each eta; min and max to the metrics.

    `steps` are (value, relative) pairs (RunConfig.landscape_steps()): a relative one multiplies the lr the
    optimizer is about to use (the papers' CIFAR-10 'cyclical learning rates', 0.5x ... 2x the one-cycle).
    """

    def __init__(self, steps: Sequence[tuple[float, bool]], every: int = 1) -> None:
        if not steps:
            raise ValueError("the landscape probe needs at least one step size")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.steps, self.every = list(steps), every

    def on_train_start(self, s: Setup, start_step: int) -> None:
        """Refuse engines that keep the gradient out of .grad before the first step, not at it."""
        if s.cfg.engine == "deepspeed" and s.cfg.zero_stage > 0:
            raise ConfigError(f"--landscape-lrs cannot read gradients under ZeRO stage {s.cfg.zero_stage}; "
                              "use --zero-stage 0 or --engine accelerate")

    def etas(self, lr: float) -> list[float]:
        """The absolute step sizes at learning rate `lr`."""
        return [v * lr if rel else v for v, rel in self.steps]

    def before_update(self, s: Setup, step: int, batches: list[Batch]) -> dict[str, Any] | None:
        """The band of this step (only on probed steps)."""
        if step % self.every:
            return None
        etas = self.etas(s.optimizer.param_groups[0]["lr"])
        losses = probe_losses(s.engine.unwrapped, batches, etas).tolist()
        finite = [v for v in losses if math.isfinite(v)]
        # A diverged point (inf or nan) is the least predictive gradient there is: the band's top is inf.
        return {"landscape_min": min(finite) if finite else math.nan,
                "landscape_max": max(losses) if len(finite) == len(losses) else math.inf,
                "landscape_lrs": etas, "landscape_losses": losses}
