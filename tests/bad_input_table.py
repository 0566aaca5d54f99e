#!/usr/bin/env python
"""Run every bad launch/run.py flag combination of tests/bad_input_cases.py as a user would; print a table.

    python tests/bad_input_table.py                                  # this checkout
    python tests/bad_input_table.py --before /tmp/old --after .      # two checkouts side by side

Each combination runs as `python <root>/launch/run.py ARGS` (with <root> first on PYTHONPATH) in a fresh,
empty working directory, next to a fresh folder of prepared files ({F}). Columns: exit code, stderr
lines, `error:` lines, traceback yes/no, files left (in the working directory, or new in {F}), and
whether the case keeps the contract: exit 2, one `error:` line, no traceback, nothing written.
Not part of the test suite (it takes minutes: a combination the old code accepts trains a whole run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_cases import fill, run_combinations, write_fixtures  # noqa: E402


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_one(root: Path, argv: list[str], timeout: float) -> dict:
    """One combination in a fresh empty cwd; what a user would see."""
    with tempfile.TemporaryDirectory(prefix="badinput-") as tmp:
        cwd, fixtures = Path(tmp) / "cwd", Path(tmp) / "F"
        cwd.mkdir()
        write_fixtures(fixtures)
        before = _tree(fixtures)
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(root / "launch/run.py"), *fill(argv, fixtures)], cwd=cwd, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, err = "timeout", (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        left = sorted(_tree(cwd)) + sorted(f"{{F}}/{p}" for p in _tree(fixtures) - before)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    tb = "Traceback" in err
    return {"argv": " ".join(argv) or "(none)", "exit": code, "stderr_lines": len(lines), "error_lines": len(errors),
            "traceback": tb, "files_left": len(left), "ok": code == 2 and len(errors) == 1 and not tb and not left,
            "seconds": round(time.perf_counter() - t0, 1), "error": errors[0] if errors else (lines[-1] if lines else "")}


def _cuda(root: Path) -> bool:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    return out.stdout.strip() == "True"


def main() -> int:
    """Print the markdown table (one checkout, or before/after) and a summary line per checkout."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, help="a checkout to compare with (e.g. main before the change)")
    p.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1], help="checkout (default: this one)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per combination")
    p.add_argument("--limit", type=int, default=0,
                   help="only the first N combinations (the issue's 19 examples come first); 0 = all")
    args = p.parse_args()
    roots = {"before": args.before, "after": args.after} if args.before else {"after": args.after}
    combos = run_combinations(cuda_available=_cuda(args.after))
    combos = combos[:args.limit] if args.limit > 0 else combos
    results: dict[str, list[dict]] = {k: [] for k in roots}
    for i, argv in enumerate(combos, 1):
        for name, root in roots.items():
            r = run_one(root.resolve(), argv, args.timeout)
            results[name].append(r)
            print(f"[{i}/{len(combos)}] {name}: {r['argv']} -> exit {r['exit']}, {r['stderr_lines']} stderr lines, "
                  f"traceback {r['traceback']}, {r['files_left']} files left ({r['seconds']} s)", file=sys.stderr, flush=True)
    cols = ["exit", "stderr_lines", "traceback", "files_left", "ok"]
    head = ["combination"] + [f"{n} {c}" for n in roots for c in cols]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for i, argv in enumerate(combos):
        cells = [f"`{results[next(iter(roots))][i]['argv']}`"]
        for name in roots:
            r = results[name][i]
            cells += [str(r["exit"]), str(r["stderr_lines"]), "yes" if r["traceback"] else "no", str(r["files_left"]),
                      "ok" if r["ok"] else "**BROKEN**"]
        print("| " + " | ".join(cells) + " |")
    print()
    for name in roots:
        rs = results[name]
        print(f"{name}: {sum(r['ok'] for r in rs)}/{len(rs)} keep the contract; tracebacks {sum(r['traceback'] for r in rs)}, "
              f"exit 0 {sum(r['exit'] == 0 for r in rs)}, files left {sum(r['files_left'] > 0 for r in rs)}, "
              f"not exit 2 {sum(r['exit'] != 2 for r in rs)}, not one error line {sum(r['error_lines'] != 1 for r in rs)}")
    print("\nerror lines (after):")
    for r in results["after"]:
        print(f"- `{r['argv']}` -> {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
