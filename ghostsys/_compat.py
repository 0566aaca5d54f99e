"""Narrow compatibility step: import torchvision's pure-Python parts on a CPU-only torch.

The torchvision wheel that matches torch 2.13 is built for CUDA; its C++ extension cannot load
against the CPU torch wheel, and ``import torchvision`` then fails because its meta registrations
name operators (``torchvision::nms``, ``torchvision::qnms``) that only the extension defines.
Datasets, transforms and models are pure Python and work once those schemas exist. We define the
schemas only when the plain import fails for exactly that reason, warn once, and import again.
The detection ops themselves stay unavailable (calling them raises), as they would on any
torchvision without its extension.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

import torch

# Schemas torchvision registers fake kernels for unconditionally (torchvision/_meta_registrations.py).
_MISSING_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_lib: torch.library.Library | None = None  # kept alive: a collected Library unregisters its ops


def _is_missing_operator_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "operator torchvision::" in str(err) and "does not exist" in str(err)


def import_torchvision() -> ModuleType:
    """Import torchvision, defining its missing operator schemas only if its extension failed to load."""
    global _lib
    try:
        import torchvision
        return torchvision
    except RuntimeError as err:
        if not _is_missing_operator_error(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package before importing it again
    _lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_SCHEMAS:
        _lib.define(schema)
    warnings.warn(
        "torchvision's C++ extension does not load against this torch (a CUDA torchvision wheel on a "
        "CPU torch); ghostsys defined its operator schemas so datasets, transforms and models work. "
        "Detection ops (nms, roi_align, ...) are unavailable.",
        RuntimeWarning,
        stacklevel=2,
    )
    import torchvision
    return torchvision
