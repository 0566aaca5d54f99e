"""Narrow compatibility step: import torchvision's pure-Python parts on a CPU-only torch.

The torchvision wheel that matches torch 2.13 is built for CUDA; its C++ extension cannot load
against the CPU torch wheel, and ``import torchvision`` then fails because its meta registrations
name operators (``torchvision::nms``, ``torchvision::qnms``) that only the extension defines.
Datasets, transforms and models are pure Python and work once those schemas exist. We define the
schemas only when the plain import fails for exactly that reason, warn once, and import again.
The detection ops themselves stay unavailable (calling them raises), as they would on any
torchvision without its extension. Where the extension loads (a CUDA torch with its matching
torchvision: the GPU-cluster case), nothing is defined, nothing is warned, nothing changes.

Two ways in:

* ``import_torchvision()``, which ghostsys calls before it needs torchvision;
* an import hook for programs ghostsys does not control: the ``accelerate`` CLI imports timm at
  start, and timm imports torchvision. ``ghostsys-torchvision.pth`` (installed into site-packages
  by ``pip install``/``make setup``, see setup.py) calls ``install_import_hook()`` in every
  interpreter of the environment. That costs one import of this torch-free module; the hook
  looks at nothing but the name ``torchvision`` and does its work only when that import fails.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

# No `typing` import: this module is imported at every interpreter start (see above), where typing
# alone costs ~7 ms; the annotations below are strings (postponed evaluation) and never evaluated.

# Schemas torchvision registers fake kernels for unconditionally (torchvision/_meta_registrations.py).
_MISSING_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# The torch.library.Library holding the schemas, kept alive: a collected Library unregisters its ops.
_lib: "torch.library.Library | None" = None


def _is_missing_operator_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "operator torchvision::" in str(err) and "does not exist" in str(err)


def _define_missing_schemas() -> None:
    """Define the operator schemas the failed import needed (once per process) and say so."""
    global _lib
    if _lib is not None:
        return
    import torch  # torchvision's own import has imported it already

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_SCHEMAS:
        lib.define(schema)
    _lib = lib
    warnings.warn(
        "torchvision's C++ extension does not load against this torch (a CUDA torchvision wheel on a "
        "CPU torch); ghostsys defined its operator schemas so datasets, transforms and models work. "
        "Detection ops (nms, roi_align, ...) are unavailable.",
        RuntimeWarning,
        stacklevel=3,
    )


def _forget_torchvision(keep: ModuleType | None = None) -> None:
    """Drop the half-imported torchvision package (but `keep`) from sys.modules before importing it again."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        if sys.modules[name] is not keep:
            del sys.modules[name]


def import_torchvision() -> ModuleType:
    """Import torchvision, defining its missing operator schemas only if its extension failed to load."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as err:
        if not _is_missing_operator_error(err):
            raise
    _forget_torchvision()
    _define_missing_schemas()
    import torchvision
    return torchvision


class _RetryLoader:
    """Runs torchvision's real loader; on the missing-operator failure defines the schemas and runs it again."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)

    def create_module(self, spec: object) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Whoever inspects the module later (importlib.resources, reload, inspect) sees the real loader.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        try:
            self._loader.exec_module(module)
        except RuntimeError as err:
            if not _is_missing_operator_error(err) or _lib is not None:
                raise
            _forget_torchvision(keep=module)  # its submodules; the package itself is being imported
            _define_missing_schemas()
            self._loader.exec_module(module)


class _TorchvisionFinder:
    """A meta-path finder for the name ``torchvision`` only: the other finders find it, we wrap the loader."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RetryLoader(spec.loader)
                return spec
        return None


def install_import_hook() -> None:
    """Make every later ``import torchvision`` in this process take the compatibility step when needed."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def import_hook_installed() -> bool:
    """Whether this interpreter has the hook (the .pth file ran, or install_import_hook was called)."""
    return any(type(f).__name__ == "_TorchvisionFinder" for f in sys.meta_path)
