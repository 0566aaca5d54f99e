"""The equivalence checker end to end: both engines on 2 CPU processes, SyncBN subgroups on 4,
SeqNorm, and deliberately wrong variants that it must catch (fault injection)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests._launch import run

pytestmark = pytest.mark.dist


def _rows(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "check.csv")


def _assert_clean_pass(proc, out: Path) -> pd.DataFrame:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "## Comparisons" in proc.stdout and "Running statistics, in words" in proc.stdout
    df = _rows(out)
    assert df["passed"].all()
    assert (df["section"] == "control").sum() >= 2  # the negative control is in every report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["control_ok"]
    return df


def test_one_process_every_factorization_float64(tmp_path):
    out = tmp_path / "c1"
    df = _assert_clean_pass(run(["--out", str(out)], script="launch/check.py", check=False), out)
    # n_g = 1, G_M = 8: G_layer 8, n_fp 2 x G_layer 4, n_fp 4 x G_layer 2 (layer), n_fp 8 (accumulate)
    facts = set(df["factorization"])
    for f in ("G_M=8 = n_g 1 x n_fp 1 x G_layer 8", "G_M=8 = n_g 1 x n_fp 2 x G_layer 4",
              "G_M=8 = n_g 1 x n_fp 4 x G_layer 2", "G_M=8 = n_g 1 x n_fp 8 x G_layer 1"):
        assert f in facts, f
    comps = df[df["section"].isin(["forward", "grads", "weights", "buffers"])]
    assert comps["max_rel"].max() < 1e-10  # float64: summation order only
    control = df[df["section"] == "control"]
    assert control["max_rel"].min() > 1e-3  # G_M = 1 vs 8 differs by orders of magnitude more


@pytest.mark.parametrize("launcher,engine", [("torchrun", "accelerate"), ("deepspeed", "deepspeed")])
def test_two_processes_both_engines(tmp_path, launcher, engine):
    out = tmp_path / engine
    proc = run(["--engine", engine, "--out", str(out)], launcher=launcher, nprocs=2, script="launch/check.py", check=False)
    df = _assert_clean_pass(proc, out)
    assert {"layer", "unsynced", "syncbn"} <= set(df["mode"])
    assert (df["section"] == "facts").sum() >= 2  # broadcast/drift and all-reduce statements, each measured
    words = proc.stdout.split("Running statistics, in words")[1]
    assert ("DDP" in words) if engine == "accelerate" else ("DeepSpeed never syncs buffers" in words)


def test_syncbn_over_subgroups_of_two_on_four_processes(tmp_path):
    out = tmp_path / "sub"
    proc = run(["--modes", "syncbn", "--sync-group-size", "2", "--out", str(out)], launcher="torchrun", nprocs=4,
               script="launch/check.py", check=False)
    df = _assert_clean_pass(proc, out)
    assert "G_M=8 = (n_g 4 / k 2) x n_fp 4 x G_layer 1" in set(df["factorization"])
    assert (df["quantity"] == "buffers rank 3").any()


def test_seqnorm_ghost_part_factorizes(tmp_path):
    out = tmp_path / "seq"
    df = _assert_clean_pass(run(["--norm", "seq", "--target-gm", "4", "--out", str(out)], script="launch/check.py",
                                check=False), out)
    assert {"layer", "accumulate"} <= set(df["mode"])


@pytest.mark.parametrize("inject,nprocs,modes,failing", [
    ("no-nfp-scaling", 1, "accumulate", "grads"),     # loss not divided by n_fp
    ("interleaved", 2, "unsynced", "logits"),         # DistributedSampler's strided order
    ("wrong-rank-buffers", 2, "unsynced", "buffers rank 0"),  # buffers taken from the wrong rank
])
def test_fault_injection_is_caught(tmp_path, inject, nprocs, modes, failing):
    out = tmp_path / inject
    proc = run(["--inject", inject, "--modes", modes, "--steps", "2", "--out", str(out)],
               launcher="torchrun" if nprocs > 1 else "python", nprocs=nprocs, script="launch/check.py", check=False)
    assert proc.returncode != 0 and "FAIL" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    df = _rows(out)
    bad = df[~df["passed"]]
    assert failing in set(bad["quantity"]), bad[["quantity", "max_rel"]]
    assert (df[df["section"] == "control"]["passed"]).all()  # the control itself still works
