"""The ``nn`` wing: norm layers, their kernels, SyncBN, swapping them into models, and the models.

Everything here takes explicit arguments and imports torch only (torchvision and timm lazily, to
build their models): no rank, device, environment variable or run config is ever read (DESIGN §4).
Typical use::

    from ghostsys.nn import GhostBatchNorm, SeqNorm, convert
    model = convert(torchvision_model, "ghost", ghost_groups=8)
"""

from ghostsys.nn.models import MODEL_NAMES, build_model
from ghostsys.nn.norms import (
    NORM_KINDS,
    STATS_POLICIES,
    GhostBatchNorm,
    NoisyBatchNorm,
    SeqNorm,
    make_norm,
)
from ghostsys.nn.swap import UnconvertibleNormError, convert, replace_batchnorm
from ghostsys.nn.syncbn import SyncBatchNorm, convert_sync

__all__ = ["GhostBatchNorm", "SeqNorm", "NoisyBatchNorm", "SyncBatchNorm", "make_norm", "convert",
           "replace_batchnorm", "convert_sync", "UnconvertibleNormError", "build_model", "MODEL_NAMES",
           "NORM_KINDS", "STATS_POLICIES"]
