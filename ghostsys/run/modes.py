"""Run modes as small strategies over the one training loop.

Every mode trains the same program; they differ only in which layer normalizes and whether
statistics are shared across ranks. Gradient accumulation (n_fp) and data parallelism (n_g) are
not modes of their own but axes of the factorization that every mode composes with
(``G_M = (n_g / k) · n_fp · G_layer``); ``accumulate``/``unsynced`` name the mechanism a run is
meant to exhibit and are validated as such in ``RunConfig.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ghostsys.run.config import RunConfig

NormFactory = Callable[[int, int], nn.Module]


def norm_factory(cfg: RunConfig) -> NormFactory:
    """The layer factory models are built with: ``factory(num_features, dim)``."""
    from ghostsys.nn.norms import make_norm

    kind = cfg.resolved_norm
    kw: dict = {}
    if kind in ("ghost", "seq"):
        kw.update(ghost_groups=cfg.layer_groups, stats_policy=cfg.stats_policy)
    if kind in ("seq", "group"):
        kw.update(channel_groups=cfg.channel_groups)
    if kind == "noisy":
        kw.update(noise_std=cfg.noise_std)
    return lambda num_features, dim: make_norm(kind, num_features, dim=dim, **kw)


@dataclass(frozen=True)
class Mode:
    """A GhostNorm mechanism: how it wraps the model and, in plain words, where statistics come from."""

    name: str
    statistics: str

    def wrap(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        """Adapt a freshly built model to this mode (most modes leave it as built)."""
        return model


@dataclass(frozen=True)
class SyncBNMode(Mode):
    """BatchNorm statistics all-reduced over blocks of k consecutive ranks."""

    def wrap(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        """Swap every BatchNorm for a SyncBatchNorm over this rank's block of k ranks."""
        from ghostsys.run import dist
        from ghostsys.nn.syncbn import convert_sync

        group = dist.consecutive_subgroups(cfg.sync_k) if cfg.world_size > 1 else None
        return convert_sync(model, group)


MODES: dict[str, Mode] = {
    "layer": Mode("layer", "explicit ghost layer: each micro-batch split into G_layer contiguous groups"),
    "accumulate": Mode("accumulate", "BatchNorm over each of the n_fp micro-batches of a step"),
    "unsynced": Mode("unsynced", "BatchNorm over each rank's own micro-batch, statistics never shared"),
    "syncbn": SyncBNMode("syncbn", "BatchNorm over the micro-batches of k consecutive ranks gathered"),
}
