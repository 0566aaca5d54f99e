"""timm models as a model source (`--model timm:<name>`), through the real CLI, and the torchvision
import hook that keeps the `accelerate` CLI working once timm is installed (it imports timm at start,
timm imports torchvision, and this machine's CUDA-built torchvision needs ghostsys' compatibility step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ghostsys.nn import build_model, make_norm
from ghostsys.nn.models import check_model_name
from ghostsys.nn.swap import GhostBatchNormAct
from tests._launch import ROOT, run, summary

SMALL = "timm:test_efficientnet"  # timm's own tiny test model: BatchNormAct2d layers, 0.36M parameters


def ghost2(num_features: int, dim: int) -> torch.nn.Module:
    return make_norm("ghost", num_features, dim=dim, ghost_groups=2)


def test_timm_model_is_built_with_the_norm_and_keeps_its_activations():
    import timm

    torch.manual_seed(0)
    model = build_model(SMALL, num_classes=7, in_shape=(1, 16, 16), norm=ghost2)
    plain = timm.create_model(SMALL[5:], num_classes=7, in_chans=1)
    acts = {p: type(m.act) for p, m in plain.named_modules() if isinstance(m, timm.layers.BatchNormAct2d)}
    layers = {p: m for p, m in model.named_modules() if isinstance(m, GhostBatchNormAct)}
    assert layers.keys() == acts.keys() and len(layers) == 13 and all(m.ghost_groups == 2 for m in layers.values())
    assert {p: type(m.act) for p, m in layers.items()} == acts  # every activation kept (Identity where timm has none)
    assert torch.nn.SiLU in acts.values()
    assert model(torch.randn(4, 1, 16, 16)).shape == (4, 7)  # in_chans and num_classes honoured


@pytest.mark.parametrize("name,expect", [
    ("timm:efficientnet_b00", "timm:efficientnet_b0"),  # a close name is suggested
    ("timm:nosuchmodel", "timm.list_models()"),
    ("tv:nosuchmodel", "torchvision.models.list_models()"),
    ("tv:resnet19", "tv:resnet18"),
    ("resnet57", "6n+2"),
    ("wrn27_10", "6n+4"),
    ("nosuchmodel", "timm:<timm model name>"),
])
def test_bad_model_names_name_the_flag_and_how_to_list(name, expect):
    with pytest.raises(ValueError) as err:
        check_model_name(name)
    assert str(err.value).startswith("--model") and expect in str(err.value)
    with pytest.raises(ValueError, match="--model"):
        build_model(name, num_classes=10, in_shape=(3, 16, 16), norm=ghost2)


def test_hook_is_installed_at_start_without_importing_torch():
    # A fresh interpreter of this environment (set up by `make setup` / `pip install`): the .pth file
    # ran and imported nothing heavy. That `import timm` then works in a program that never calls
    # ghostsys is what the accelerate launch below shows (the accelerate CLI imports timm at start).
    code = textwrap.dedent("""
        import json, sys
        heavy = [m for m in ("torch", "torchvision", "timm", "numpy", "typing") if m in sys.modules]
        from ghostsys._compat import import_hook_installed
        print(json.dumps({"heavy": heavy, "hooked": import_hook_installed()}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"heavy": [], "hooked": True}


@pytest.mark.slow
def test_accelerate_launch_trains_a_timm_model(tmp_path):
    # The accelerate CLI imports timm before it runs anything: this fails at start without the hook.
    out = tmp_path / "timm"
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--cpu", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "launch/run.py"),
         "--model", SMALL, "--mode", "layer", "--ghost-groups", "2", "--batch-size", "16", "--max-steps", "1",
         "--no-progress", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = summary(out)
    assert s["status"] == "complete" and s["model"] == SMALL


@pytest.mark.slow
def test_checker_accepts_a_timm_model(tmp_path):
    out = tmp_path / "check"
    proc = run(["--model", SMALL, "--batch-size", "16", "--target-gm", "2", "--steps", "1", "--out", str(out)],
               script="launch/check.py", check=False)
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["control_ok"]
