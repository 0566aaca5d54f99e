"""Mixed precision as a run setting: applied by each engine's own mechanism, recorded, part of the identity, refused where it cannot run."""

from __future__ import annotations

import json

import pytest
import torch

from ghostsys.run.config import RunConfig
from ghostsys.run.train import Callback, train
from launch.run import main as run_main
from tests._launch import run, summary
from tests._refusal import assert_refused

FAST = ["--batch-size", "16", "--max-steps", "2", "--no-progress"]


def test_mixed_precision_is_part_of_the_identity():
    fp32, bf16 = RunConfig(), RunConfig(mixed_precision="bf16")
    assert fp32.run_dir() != bf16.run_dir() and "-bf16-" in bf16.run_name()
    assert fp32.identity() != bf16.identity()
    back = RunConfig.from_dict(json.loads(json.dumps(bf16.resolved())))
    assert back.identity() == bf16.identity()  # config.json maps back to the same run


class _ConvDtype(Callback):
    """Records the dtype the first conv computes in (inside the engine's autocast, if any)."""

    def on_train_start(self, s, start_step):
        self.dtypes = []
        conv = next(m for m in s.engine.unwrapped.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda mod, inp, out: self.dtypes.append(out.dtype))


def test_accelerate_bf16_runs_under_autocast_and_is_recorded(tmp_path):
    probe = _ConvDtype()
    out = tmp_path / "bf16"
    s = train(RunConfig(batch_size=16, max_steps=2, progress=False, device="cpu", mixed_precision="bf16",
                        out=str(out)), callbacks=[probe])
    assert probe.dtypes and set(probe.dtypes) == {torch.bfloat16}
    assert s["mixed_precision"] == "bf16" and torch.isfinite(torch.tensor(s["final_train_loss"]))
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "bf16"
    # The same --out with full precision is another experiment: refused, naming the field.
    with pytest.raises(Exception, match="differs in: mixed_precision"):
        train(RunConfig(batch_size=16, max_steps=2, progress=False, device="cpu", out=str(out)))


def test_deepspeed_bf16_runs_on_cpu(tmp_path):
    """DeepSpeed's own bf16 mode (bf16 weights and buffers, float32 masters) trains and checkpoints on CPU."""
    run([*FAST, "--engine", "deepspeed", "--mixed-precision", "bf16", "--out", str(tmp_path / "ds")], timeout=240)
    s = summary(tmp_path / "ds")
    assert s["status"] == "complete" and s["mixed_precision"] == "bf16"
    assert (tmp_path / "ds" / "checkpoints").is_dir()


@pytest.mark.parametrize("args,env,expect", [
    ([], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "pass --mixed-precision bf16"),   # the launcher contradicts the run
    (["--mixed-precision", "no"], {"ACCELERATE_MIXED_PRECISION": "fp16"}, "launch with --mixed_precision no"),
    (["--mixed-precision", "fp8"], {}, "--mixed-precision 'fp8' is unknown"),
    (["--mixed-precision", "bf16", "--dtype", "float64"], {}, "--dtype float32"),
    (["--mixed-precision", "fp16", "--device", "cpu"], {}, "needs a CUDA device"),
    (["--mixed-precision", "fp16", "--engine", "deepspeed"], {}, "--mixed-precision bf16"),
    pytest.param(["--mixed-precision", "fp16"], {}, "needs a CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs where CUDA is present")),
])
def test_mixed_precision_refusals(tmp_path, capsys, monkeypatch, args, env, expect):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert_refused(run_main, [*FAST, *args], tmp_path / "w", capsys, expect)


def test_accelerate_launch_mixed_precision_without_the_flag_is_refused(tmp_path):
    """`accelerate launch --mixed_precision bf16 launch/run.py` used to train bf16 while config.json said fp32."""
    import os
    import subprocess
    import sys

    from tests._launch import ROOT

    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--cpu",
                           "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16",
                           "--dynamo_backend", "no", str(ROOT / "launch/run.py"), *FAST, "--out", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "the launcher asks for mixed precision bf16" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_engines_of_another_precision_follow_in_one_process(tmp_path):
    """Accelerate keeps one precision per process: a float32 run after a bf16 one (checker, tests) must still run."""
    for i, mp in enumerate(("bf16", "no", "bf16")):
        s = train(RunConfig(batch_size=16, max_steps=1, progress=False, device="cpu", mixed_precision=mp,
                            out=str(tmp_path / f"r{i}")))
        assert s["mixed_precision"] == mp
