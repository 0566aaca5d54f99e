"""The ``nn`` wing: norm layers, their kernels, SyncBN and the papers' models.

Everything here takes explicit arguments and imports torch only: no rank, device, environment
variable or run config is ever read (DESIGN §4). Typical use::

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
    convert,
    make_norm,
    replace_batchnorm,
)
from ghostsys.nn.syncbn import SyncBatchNorm, convert_sync

__all__ = ["GhostBatchNorm", "SeqNorm", "NoisyBatchNorm", "SyncBatchNorm", "make_norm", "convert",
           "replace_batchnorm", "convert_sync", "build_model", "MODEL_NAMES", "NORM_KINDS", "STATS_POLICIES"]
