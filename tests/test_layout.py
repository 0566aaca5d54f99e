"""The package's wings (DESIGN §4): imports only point down, launch -> check/profile/study -> run -> nn."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ghostsys"
# What each wing may import from ghostsys besides itself (the private top-level _compat is a leaf below all).
ALLOWED = {
    "nn": {"_compat"},
    "run": {"nn", "_compat"},
    "check": {"run", "nn", "_compat"},
    "profile": {"run", "nn", "_compat"},
    "study": {"run", "nn", "_compat"},
}


def _ghostsys_imports(path: Path) -> set[str]:
    """The second component of every `ghostsys.<x>` module a file imports (at any depth, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "ghostsys" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("wing", sorted(ALLOWED))
def test_imports_point_down_only(wing: str) -> None:
    files = sorted((PKG / wing).rglob("*.py"))
    assert files, f"wing {wing} has no modules"
    bad = {str(f.relative_to(PKG)): sorted(_ghostsys_imports(f) - ALLOWED[wing] - {wing}) for f in files}
    assert not {k: v for k, v in bad.items() if v}, f"upward or sideways imports: {bad}"


def test_the_package_shows_its_wings() -> None:
    wings = {p.name for p in PKG.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert set(ALLOWED) <= wings
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert flat == ["__init__.py", "_compat.py", "bench.py"], f"modules outside the wings: {flat}"


def test_nn_never_reads_the_environment_or_rank() -> None:
    offenders = []
    for f in (PKG / "nn").rglob("*.py"):
        text = f.read_text()
        for needle in ("os.environ", "getenv", "get_rank(", "LOCAL_RANK", "WORLD_SIZE"):
            if needle in text:
                offenders.append(f"{f.name}: {needle}")
    assert not offenders, offenders
