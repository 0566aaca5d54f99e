"""launch/profile.py end to end: a real sweep over 1 and 2 CPU processes (gloo) through `accelerate launch`.

ResNet-20 has 19 BatchNorm layers, so SyncBN issues 3 x 19 = 57 statistics all-reduces per step (two in
each forward, one in each backward) against unsynced's one gradient all-reduce, DDP's buffer broadcast
and the loop's loss reduction: its collectives' share must come out clearly higher, and attributed to SyncBN.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ghostsys.study import load, load_ranks
from tests._launch import ROOT

pytestmark = pytest.mark.dist

BN_LAYERS = 19  # resnet20: the stem's + 2 per block x 9 blocks
SWEEP = ["--modes", "unsynced,syncbn", "--world-sizes", "1,2", "--steps", "3", "--warmup", "1", "--profiled-steps", "2",
         "--model", "resnet20", "--batch-size", "16", "--scaling", "strong", "--no-progress"]
COLUMNS = {"samples_per_s", "step_time_median_s", "step_time_p90_s", "peak_mem_bytes", "mem_per_sample_bytes",
           "collective_share", "exposed_collective_share", "scaling_efficiency", "world_size", "mode", "engine",
           "mixed_precision", "threads_per_process", "scaling", "batch_size", "nfp", "lr", "seed", "model",
           "env.torch", "env.cpu", "env.hostname", "collective_share_syncbn", "collective_share_grad",
           "sampler_overhead_frac", "profiler_cost_frac", "nvml_note"}


def _profile(out) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "launch/profile.py"), *SWEEP, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def sweep(profile_sweep):
    out, proc = profile_sweep  # tests/conftest.py: run once per session, shared with the analysis notebooks' test
    return out, proc, load(out).set_index(["mode", "world_size"])


def test_rows_load_with_every_setting(sweep):
    out, proc, df = sweep
    assert len(df) == 4 and (df["status"] == "complete").all() and df["profile"].all()
    assert COLUMNS <= set(df.reset_index().columns), COLUMNS - set(df.reset_index().columns)
    assert (df["threads_per_process"] == 1).all() and (df["mixed_precision"] == "no").all()
    assert (df["timed_steps"] == 3).all() and (df["samples_per_s"] > 0).all()
    assert (df["step_time_p10_s"] <= df["step_time_median_s"]).all() and (df["step_time_median_s"] <= df["step_time_p90_s"]).all()
    assert df["nvml_note"].str.contains("NVML").all() or torch.cuda.is_available()
    ranks = load_ranks(out)
    assert sorted(ranks.groupby("mode")["rank"].apply(list).sum()) == [0, 0, 0, 0, 1, 1]
    assert (out / "profile.csv").exists() and "| syncbn | accelerate |" in proc.stdout


def test_scaling_efficiency_is_measured_against_one_process(sweep):
    _, _, df = sweep
    for mode in ("unsynced", "syncbn"):
        one, two = df.loc[(mode, 1)], df.loc[(mode, 2)]
        assert one["scaling"] == "base" and one["scaling_efficiency"] == 1.0
        assert two["scaling"] == "strong"
        assert two["scaling_efficiency"] == pytest.approx(two["samples_per_s"] / (2 * one["samples_per_s"]))


def test_syncbn_collectives_are_counted_attributed_and_cost_more(sweep):
    _, _, df = sweep
    sync, unsync = df.loc[("syncbn", 2)], df.loc[("unsynced", 2)]
    assert sync["collectives_per_step_syncbn"] == 3 * BN_LAYERS  # every statistics all-reduce, named SyncBN's
    assert unsync["collectives_per_step_syncbn"] == 0
    assert unsync["collectives_per_step_grad"] >= 1 and unsync["collective_share_grad"] > 0
    assert sync["collective_share_syncbn"] > 0.1
    # SyncBN adds collectives to every step; whether they also take a larger share of the step is a wall-clock
    # comparison (seen flipped, 0.67 vs 0.71, with another process on the cores), which tests do not assert.
    calls = {m: sum(v for k, v in row.items() if k.startswith("collectives_per_step_") and v == v) for m, row in
             (("syncbn", sync), ("unsynced", unsync))}
    assert calls["syncbn"] >= calls["unsynced"] + 3 * BN_LAYERS, calls
    assert 0 <= sync["exposed_collective_share"] <= sync["collective_share"] <= 1
    for mode in ("unsynced", "syncbn"):  # one process: nothing to reduce
        assert df.loc[(mode, 1)]["collective_share"] == 0 and df.loc[(mode, 1)]["collective_backend"] == "none"


def test_a_finished_sweep_is_not_run_again(sweep):
    out, _, df = sweep
    again = _profile(out)
    assert again.stdout.count("already profiled") == 4
    assert load(out).set_index(["mode", "world_size"])["samples_per_s"].equals(df["samples_per_s"])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: CUDA allocator peaks, NVML sampling and NCCL traces are GPU-only")
def test_profile_on_one_gpu(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/profile.py"), "--modes", "accumulate", "--world-sizes", "1",
                           "--mixed-precision", "no,bf16", "--steps", "3", "--warmup", "1", "--profiled-steps", "1",
                           "--device", "cuda", "--no-progress", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(out)
    assert len(df) == 2 and (df["peak_mem_reserved_bytes"] >= df["peak_mem_bytes"]).all() and (df["alloc_retries"] >= 0).all()
    assert "cuda max allocated" in df["peak_mem_kind"].iloc[0]
    assert df["nvml_note"].isna().all() or df["nvml_note"].str.contains("NVML").all()
