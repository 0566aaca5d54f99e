"""PyTorch's own BatchNorm module tests (common_modules.module_db) pass on GhostBatchNorm(ghost_groups=1)
and NoisyBatchNorm(noise_std=0), bit for bit; SeqNorm takes every BatchNorm argument with its meaning.

The cases run in tests/module_db_worker.py, in a subprocess (importing torch.testing._internal changes
global torch state), one JSON line per case; see its docstring for what is compared and why the
tolerance is zero. Every BatchNorm ModuleInfo of the installed torch is iterated, so new cases count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    """Every case of every layer, from one worker run."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "module_db_worker.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    by_layer: dict[str, list[dict]] = defaultdict(list)
    for line in proc.stdout.splitlines():
        row = json.loads(line)
        by_layer[row["layer"]].append(row)
    return by_layer


def _failures(rows: list[dict]) -> list[str]:
    return [f"{r['module']} {r['case']} {r['dtype']} {'train' if r['training'] else 'eval'}: {r['why']}"
            for r in rows if not r["ok"]]


@pytest.mark.parametrize("layer", ["ghost", "noisy", "seq"])
def test_every_batchnorm_case_of_module_db(results, layer):
    rows = results[layer]
    # torch 2.13: 3 BatchNorm ModuleInfos x 2 dtypes x 2 modes x (7 or 8 inputs + 2 error inputs) = 112.
    # At least the 50 cases per dtype the issue counted, so an empty or truncated run cannot pass.
    assert len(rows) >= 100, f"only {len(rows)} module_db cases ran"
    assert {r["module"] for r in rows} == {"nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"}
    assert any("not_bias" in r["case"] for r in rows)  # the bias=False cases the issue found failing
    assert not _failures(rows), "\n".join(_failures(rows))


def test_negative_control_two_ghost_groups_fails_in_training_only(results):
    rows = results["ghost2"]
    training = [r for r in rows if r["training"] and not r["case"].startswith("error") and r["case"] != "zero_batch"]
    assert training and all(not r["ok"] for r in training), "two ghost groups must differ from BatchNorm in training"
    # Eval uses the running statistics (never ghosts), and the error inputs still raise BatchNorm's errors.
    assert not _failures([r for r in rows if not r["training"] or r["case"].startswith("error")])
