"""The bad-input contract of every entry script, as one assertion (issue "Solid ground", part 2).

A user-fixable error is ONE line on stderr, ``error: ...``, naming the flag and the fix; the exit
code is 2; and nothing is written: no run directory, no file. Entry scripts expose
``main(argv) -> int``, so the contract is checked in-process (fast enough to walk every field of a
config) with the working directory moved to an empty folder, which must still be empty afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import pytest


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_refused(main: Callable[[list[str]], int], argv: Sequence[str], where: Path,
                   capsys: pytest.CaptureFixture, expect: str = "", code: int = 2) -> str:
    """Run main(argv) in the empty folder `where`; assert one `error:` line containing `expect`, exit `code`,
    and an unchanged (empty) folder. Returns the error line."""
    where.mkdir(parents=True, exist_ok=True)
    assert not _tree(where), f"{where} must start empty"
    old = Path.cwd()
    capsys.readouterr()  # drop anything printed before
    os.chdir(where)
    try:
        got = main(list(argv))
    except SystemExit as exc:  # argparse refuses malformed values itself, with exit 2
        got = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or ": error:" in ln]
    assert got == code, f"{list(argv)}: exit {got}, expected {code}\nstderr:\n{err}\nstdout:\n{out[-2000:]}"
    assert len(errors) == 1, f"{list(argv)}: expected exactly one error line, got:\n{err}"
    assert "Traceback" not in err, f"{list(argv)}: traceback on stderr:\n{err}"
    assert expect.lower() in errors[0].lower(), f"{list(argv)}: error line lacks {expect!r}: {errors[0]}"
    left = _tree(where)
    assert not left, f"{list(argv)}: left files behind: {left[:10]}"
    return errors[0]
