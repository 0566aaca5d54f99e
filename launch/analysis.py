#!/usr/bin/env python
"""Run the short real CPU sweep behind the analysis notebooks, then execute every notebook against it.

    python launch/analysis.py                          # everything (a few minutes on 2 cores) -> runs/analysis/
    python launch/analysis.py --only modes,tuning      # those parts' runs and notebooks
    python launch/analysis.py --skip-sweep             # the notebooks against whatever results exist

Writes <out>/tables/ (sweep tables), <out>/results/<part>/ (runs, checks, profiles), <out>/notebooks/*.ipynb
(executed) and <out>/figures/*.png (with the rows behind each as .csv). A rerun skips finished runs.
Parts: modes, landscape, tuning, check (the equivalence notebook), profile (the cost notebook).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ghostsys.study.analysis import NOTEBOOK_PART, PARTS


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(PARTS)} (comma-separated)")
    return parts


def build() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="launch/analysis.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path("runs/analysis"), help="output folder (default: runs/analysis)")
    p.add_argument("--only", type=_parts, default=list(PARTS), help=f"comma-separated parts (default: all of {','.join(PARTS)})")
    p.add_argument("--skip-sweep", action="store_true", help="run no training, check or profile: only the notebooks")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the in-process runs (default 1: tiny models)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when every run and notebook succeeded; 1 if any failed; 2 (one error line) for bad input."""
    args = build().parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file; pass a folder (default runs/analysis)", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"error: --threads {args.threads} must be >= 1", file=sys.stderr)
        return 2
    import os

    import torch

    from ghostsys.study.analysis import run_notebooks, sweep

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the launched runs' threads per process
    t0 = time.perf_counter()
    failed = [] if args.skip_sweep else sweep(args.out, args.only)
    names = [n for n, part in NOTEBOOK_PART.items() if part in args.only]
    print("notebooks:")
    failed += run_notebooks(args.out, names)
    print(f"\nexecuted notebooks: {args.out / 'notebooks'}/   figures (PNG + the rows behind each, CSV): "
          f"{args.out / 'figures'}/   ({time.perf_counter() - t0:.0f} s)")
    if failed:
        print(f"error: {len(failed)} failed: {', '.join(failed)} (logs in {args.out / 'results'}/*/logs/)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
