"""Building and loading the fused ghost batch-norm kernel (ghostsys/nn/fused.py): from scratch in a fresh
folder by two processes at once, and what happens without a working compiler. Its numerics are tested with
the other kernels in tests/test_ghost_kernels.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ghostsys.nn import _ghost_kernels, fused
from ghostsys.nn.norms import GhostBatchNorm
from tests._launch import ROOT

# A process that builds into a fresh folder, loads the library and checks one layer against the ATen kernel.
BUILDER = textwrap.dedent("""
    import sys, pathlib, torch
    from ghostsys.nn import fused
    from ghostsys.nn.norms import GhostBatchNorm
    fused.BUILD_ROOT = pathlib.Path(sys.argv[1])
    assert fused.available(), fused.build_error()
    x = torch.randn(32, 10, dtype=torch.float64)
    a, b = GhostBatchNorm(10, ghost_groups=4, impl="fused", dtype=torch.float64), GhostBatchNorm(10, ghost_groups=4, impl="cols", dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-12)
    print(fused.library_path())
""")


def test_two_processes_build_one_fresh_library_together(tmp_path):
    root = tmp_path / "build"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1  # the same library: the second process waited for the first one's build
    # One library and the lock file: no half-written library, no temporary folder left behind.
    assert sorted(p.name for p in root.iterdir()) == sorted([paths.pop().rsplit("/", 1)[1], "build.lock"])


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A fresh build folder and a compiler that does not exist: what a machine without g++ gives."""
    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setattr(fused, "BUILD_ROOT", tmp_path / "build")
    monkeypatch.setattr(fused, "_compiler", lambda: str(tmp_path / "no-such-c++"))
    return tmp_path / "build"


def test_without_a_compiler_auto_warns_once_and_uses_the_aten_kernels(no_compiler):
    x = torch.randn(16, 6)
    with pytest.warns(RuntimeWarning, match="could not be built .*no-such-c\\+\\+.*Install g\\+\\+"):
        assert not fused.available()
    assert "no-such-c++" in fused.build_error()
    assert _ghost_kernels.choose_impl(x, 4, None) == "cols"
    torch.testing.assert_close(GhostBatchNorm(6, ghost_groups=4)(x), GhostBatchNorm(6, ghost_groups=4, impl="cols")(x),
                               rtol=0, atol=0)  # the same kernel, so the same bits
    with pytest.raises(RuntimeError, match="impl='fused': the kernel could not be built"):
        GhostBatchNorm(6, ghost_groups=4, impl="fused")(x)
    assert not any(no_compiler.glob("*.so"))  # nothing half-built left to be loaded later


def test_a_failing_compile_is_reported_with_its_message(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "BUILD_ROOT", tmp_path)
    monkeypatch.setattr(fused, "_compiler", lambda: "false")  # a compiler that exits 1
    with pytest.raises(RuntimeError, match="false exited 1"):
        fused.build()
    assert not any(tmp_path.glob("*.so")) and not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_the_library_is_keyed_by_source_and_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "BUILD_ROOT", tmp_path)
    here = fused.library_path()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert fused.library_path() != here and fused.library_path().parent == here.parent
