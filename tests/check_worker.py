"""Several equivalence checks in ONE launch: process start-up (torch, accelerate, deepspeed imports) and the
rendezvous dominate a small check, so tests/test_check.py runs its float32 cases through this script.

    torchrun --nproc_per_node 2 tests/check_worker.py OUT '{"name": {CheckConfig fields}, ...}'

Each case runs exactly as ``launch/check.py`` would run it (``checker.check_on``), one after the other in
the same processes, and rank 0 writes OUT/<name>/{check.jsonl, check.csv, summary.json}. The launch
exits 0 when every case ran; the verdicts are in the summaries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launchers run us by path, not from the repo root

import torch

from ghostsys.check.checker import CheckConfig, check_on
from ghostsys.run import dist
from ghostsys.run.cli import exit_process


def main(argv: list[str]) -> int:
    """Run every case of argv[1] (JSON: name -> CheckConfig fields) with results under argv[0]."""
    out, cases = Path(argv[0]), json.loads(argv[1])
    torch.set_num_threads(1)
    info = dist.init(device="cpu")
    try:
        for name, fields in cases.items():
            check_on(CheckConfig(**fields, out=str(out / name)), info)
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    exit_process(lambda: main(sys.argv[1:]))
