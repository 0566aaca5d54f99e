"""The profiler's parts in one process: interval arithmetic, the NVML-absent path, the RSS window, bad input.

The real 2-process profile (launch/profile.py through the launchers) is tests/test_profile_e2e.py.
"""

from __future__ import annotations

import pytest
import torch

from ghostsys.profile.callback import ProfileCallback
from ghostsys.profile.collectives import clip, length, merge, subtract
from ghostsys.profile.samplers import NVML_FIELDS, NvmlSampler, reset_rss_peak, rss_bytes
from ghostsys.run.config import RunConfig
from ghostsys.run.train import Callback, train
from launch.profile import main as profile_main
from tests._refusal import assert_refused

MiB = 2**20


def test_interval_arithmetic():
    u = merge([(5, 7), (0, 2), (1, 3), (6, 9), (9, 9)])
    assert u == [(0, 3), (5, 9)] and length(u) == 7
    assert clip(u, (2, 6)) == [(2, 3), (5, 6)]
    assert subtract(u, merge([(1, 2), (4, 6), (8, 20)])) == [(0, 1), (2, 3), (6, 8)]
    assert subtract(u, []) == u and subtract([], u) == []


def _nvml_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(_nvml_present(), reason="NVML is present on this machine: the absent path cannot run here")
def test_nvml_absent_gives_empty_fields_and_one_note():
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        sampler = NvmlSampler(device)
        sampler.start()  # must not raise
        row = sampler.stop(steps=10)
        assert all(row[k] is None for k in NVML_FIELDS), row
        assert "NVML unavailable" in row["nvml_note"] and "LibraryNotFound" in row["nvml_note"]
        assert sampler.cpu_s == 0.0  # no thread was started


class _BigBuffer(Callback):
    """Touches `size` bytes at the start of step `at` and frees them at once."""

    def __init__(self, at: int, size: int) -> None:
        self.at, self.size = at, size

    def on_step_start(self, s, step) -> None:
        if step == self.at:
            buf = torch.ones(self.size // 4)  # written, so resident
            del buf


def _profiled_run(tmp_path, name: str, big_at: int) -> dict:
    prof = ProfileCallback(warmup=2, timed=3, profiled=0)
    cfg = RunConfig(batch_size=16, max_steps=prof.total_steps, epochs=prof.total_steps, eval_every=10**9,
                    progress=False, device="cpu", out=str(tmp_path / name))
    # The buffer callback runs before the profiler's: at step W it lands before the window opens.
    return train(cfg, callbacks=[_BigBuffer(big_at, 256 * MiB), prof])


@pytest.mark.skipif(not reset_rss_peak(), reason="needs Linux's /proc/self/clear_refs to reset the RSS high-water mark")
def test_rss_peak_counts_the_measured_window_only(tmp_path):
    warm = _profiled_run(tmp_path, "warm", big_at=0)  # allocated and freed during warm-up
    inside = _profiled_run(tmp_path, "inside", big_at=3)  # negative control: during the timed window
    base = rss_bytes()
    assert warm["peak_mem_bytes"] < base + 128 * MiB, (warm["peak_mem_bytes"], base)
    assert inside["peak_mem_bytes"] > base + 200 * MiB, (inside["peak_mem_bytes"], base)
    assert warm["mem_per_sample_bytes"] == warm["peak_mem_bytes"] / 16
    assert "VmHWM reset after warm-up" in warm["peak_mem_kind"]
    assert 0 <= warm["sampler_overhead_frac"] < 1  # measured on every row (hooks + NVML thread); no time asserted


@pytest.mark.parametrize("args,expect", [
    (["--modes", "warp"], "--modes"),
    (["--engines", "torch"], "--engines"),
    (["--world-sizes", "0,2"], "--world-sizes"),
    (["--world-sizes", "one"], "--world-sizes"),
    (["--steps", "0"], "--steps"),
    (["--warmup", "0"], "--warmup"),
    (["--profiled-steps", "-1"], "--profiled-steps"),
    (["--scaling", "sideways"], "--scaling"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--mixed-precision", "fp16", "--device", "cpu"], "CUDA"),
    (["--launcher", "slurm"], "--launcher"),
    (["--threads-per-process", "-1"], "--threads-per-process"),
    (["--target-gm", "4", "--nfps", "2"], "drop --nfps"),
    (["--modes", "unsynced", "--target-gm", "3", "--batch-size", "96"], "--target-gm 3 is not reachable"),
    (["--modes", "accumulate", "--nfps", "3", "--batch-size", "32"], "valid --nfp"),
    (["--batch-size", "33", "--world-sizes", "2", "--scaling", "strong"], "not divisible"),
    (["--engines", "deepspeed", "--dtype", "float64"], "--dtype float32"),
    (["--modes", "layer", "--ghost-groups", "5", "--batch-size", "32"], "valid --ghost-groups"),
])
def test_profile_bad_input_is_refused(tmp_path, capsys, args, expect):
    assert_refused(profile_main, args, tmp_path / "w", capsys, expect)


def test_profile_under_a_launcher_profiles_one_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert_refused(profile_main, ["--modes", "unsynced,syncbn", "--world-sizes", "1"], tmp_path / "w", capsys,
                   "profiles ONE run")
