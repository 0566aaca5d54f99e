"""The fused CPU kernel for ghost batch norm on (M, C), channels_last and NCHW memory: build, load, call.

``csrc/ghost_cols.cpp`` does in one call what the ATen formulation ("cols") needs about 25 small ops
for; on SimpleNet's (256, 300) and (256, 512) layers that per-op cost, not the arithmetic, was the
whole gap to ``nn.BatchNorm`` (``python -m ghostsys.bench`` measures it). It is compiled once per
machine, source and torch version with the C++ compiler PyTorch extensions use (``c++`` unless CXX
says otherwise) into ``<torch extensions cache>/ghostsys/`` and loaded with
``torch.ops.load_library``. Where it cannot be built, ``available()`` warns once and returns False,
and ``impl="auto"`` keeps to the ATen kernels: slower, the same numbers.

``make setup`` builds it ahead of time (``ghostsys.nn.fused.build()``); otherwise the first training
forward that needs it does (about 20 s on 2 cores).

Robust to concurrent and killed builds: an exclusive ``flock`` (released by the kernel when its
holder dies) serializes builders, and each compiles to a temporary file renamed into place, so a
library on disk is always whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import cpp_extension

from ghostsys.nn._ghost_common import Average, Stats, apply_plan

__all__ = ["available", "build", "build_error", "library_path", "ghost_cols", "supports"]

SOURCE = Path(__file__).with_name("csrc") / "ghost_cols.cpp"
# No -march: one binary for any x86-64 (the hot loops carry their own AVX2 clones); no -ffast-math,
# which would drop NaN propagation. -fno-math-errno lets sqrt vectorize. -fopenmp: at::parallel_for is
# an inline OpenMP loop, serial without it; the libgomp it links is the one torch has already loaded.
CFLAGS = ("-O3", "-fno-math-errno", "-fopenmp", "-std=c++17", "-fPIC", "-shared", "-w")
_state: dict[str, object] = {}  # "ok": bool once tried; "error": the reason it failed
BUILD_ROOT: Path | None = None  # None: torch's extension cache (tests point it at a fresh folder)


def _compiler() -> str:
    """The compiler PyTorch's own extension builder would use (CXX, else c++)."""
    return cpp_extension.get_cxx_compiler()


def _command(cxx: str, out: Path) -> list[str]:
    """The whole compile-and-link command for the library at `out`."""
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    link = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    return [cxx, *CFLAGS, abi, *inc, str(SOURCE), "-o", str(out), *link]


def library_path() -> Path:
    """Where the library for this source, torch build, Python and compiler lives (built or not)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    for part in (torch.__version__, torch.__file__, sys.version, _compiler(), *CFLAGS):
        key.update(part.encode())
    root = BUILD_ROOT if BUILD_ROOT is not None else Path(cpp_extension.get_default_build_root()) / "ghostsys"
    return root / f"ghost_cols-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library unless it is already there; return its path. Raises RuntimeError on failure."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse
        if path.exists():
            return path
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            cmd = _command(_compiler(), out)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as e:  # no compiler at all
                raise RuntimeError(f"{cmd[0]}: {e.strerror}") from None
            if proc.returncode:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: " + " | ".join(tail))
            out.replace(path)  # atomic: a reader never sees half a library
    return path


def available() -> bool:
    """Whether the fused kernel is loaded (building it on first call); warns once if it cannot be."""
    if "ok" not in _state:
        try:
            torch.ops.load_library(str(build()))
            _state["ok"] = True
        except (RuntimeError, OSError) as e:
            _state["ok"], _state["error"] = False, str(e)
            warnings.warn(f"ghostsys: the fused ghost batch-norm kernel could not be built ({e}); (M, C) and "
                          "channels_last inputs use the slower ATen kernels. Install g++ (or set CXX) to get it.",
                          RuntimeWarning, stacklevel=2)
    return bool(_state["ok"])


def build_error() -> str:
    """Why the kernel could not be loaded ('' if it was, or has not been tried)."""
    return str(_state.get("error", ""))


def supports(x: Tensor, weight: Tensor | None, bias: Tensor | None, stats: Stats) -> bool:
    """Whether ghost_cols takes this call as it is: CPU float32/float64, parameters and buffers alike."""
    dtype = x.dtype
    if not x.is_cpu or (dtype is not torch.float32 and dtype is not torch.float64) or not x.numel():
        return False  # (an empty input goes where it always went)
    # Attribute reads only (no torch.device objects): this runs on every training forward.
    for t in (weight, bias) if not isinstance(stats, Average) else (weight, bias, stats.running_mean,
                                                                       stats.running_var):
        if t is not None and (t.dtype is not dtype or not t.is_cpu or not t.is_contiguous()):
            return False
    return True


def ghost_cols(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
               stats: Stats) -> Tensor:
    """Ghost batch norm of a dense (M, C), channels_last or NCHW x in one fused call (see the module docstring)."""
    op = torch.ops.ghostsys.ghost_cols.default  # the overload itself: skips the packet's dispatch (~1 us a call)
    if isinstance(stats, Average):  # the kernel takes the EMA step itself: no extra ops
        return op(x, groups, weight, bias, stats.running_mean, stats.running_var, stats.factor, eps)[0]
    y, mean, var = op(x, groups, weight, bias, None, None, 0.0, eps)
    apply_plan(stats, mean, var)
    return y

