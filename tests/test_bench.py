"""The benchmark's plumbing (not its figures: tests never assert timings): it covers the layer shapes
the papers' models really run, and a smoke run prints every table with sane rows."""

from __future__ import annotations

import pytest
import torch

from ghostsys.bench import main, model_norm_shapes


def test_model_norm_shapes_are_the_papers_layers():
    # Read off the models themselves, at the papers' batch sizes: what the default table times.
    assert model_norm_shapes("simplenet") == [(256, 512), (256, 300)]
    assert model_norm_shapes("resnet56") == [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
    assert model_norm_shapes("wrn28_10") == [(128, 16, 32, 32), (128, 160, 32, 32), (128, 320, 16, 16),
                                             (128, 640, 8, 8)]


def test_quick_run_prints_every_table(capsys):
    rows = main(["--quick", "--threads", "1", "--clock", "thread"])
    out = capsys.readouterr().out
    for needle in ("machine:", "torch", "before: load average", "after: load average", "Layers:", "Training steps"):
        assert needle in out, needle
    variants = {r["variant"] for r in rows}
    assert {"BatchNorm", "GhostBatchNorm G=2", "chunk loop G=2", "Figure-2 G=2", "group_norm+BatchNorm",
            "SeqNorm G_C=4 G_M=2", "GhostBatchNorm G=16", "SeqNorm G_C=4 G_M=16"} <= variants
    assert all(0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["variant"] == r["baseline"])


@pytest.mark.parametrize("argv,expect", [(["--clock", "thread", "--threads", "1,2"], "one CPU thread"),
                                         (["--models", "vgg"], "unknown model"),
                                         (["--step-threads", "2", "--threads", "1", "--clock", "thread"],
                                          "--step-threads")])
def test_bad_input_is_refused(argv, expect, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and expect in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cuda"])
    assert exit_.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_autocast_feeds_the_layers_bf16(monkeypatch, capsys):
    # What a bf16 network's norm layer sees: bf16 activations under autocast, its parameters kept float32.
    import ghostsys.bench as bench

    seen = []

    class Recording(bench.GhostBatchNorm):
        def forward(self, x):
            seen.append((x.dtype, self.weight.dtype, torch.is_autocast_enabled("cpu")))
            return super().forward(x)

    monkeypatch.setattr(bench, "GhostBatchNorm", Recording)
    rows = main(["--quick", "--threads", "1", "--autocast", "bf16", "--models", "none"])
    assert "bf16 autocast" in capsys.readouterr().out
    assert seen and set(seen) == {(torch.bfloat16, torch.float32, True)}
    assert {r["autocast"] for r in rows} == {"bfloat16"}
    fp32 = bench.benchmark((8, 4), (1,), reps=1, warmup=0, groups=(2,), seq=None)  # the negative control
    assert {r["autocast"] for r in fp32} == {"no"} and seen[-1][0] == torch.float32
