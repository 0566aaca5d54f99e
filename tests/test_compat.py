"""The torchvision compatibility step: narrow (only for the missing-operator failure), warns once, works."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from ghostsys._compat import _is_missing_operator_error


def test_only_the_missing_operator_error_is_handled():
    assert _is_missing_operator_error(RuntimeError("operator torchvision::nms does not exist"))
    assert not _is_missing_operator_error(RuntimeError("CUDA out of memory"))
    assert not _is_missing_operator_error(ImportError("operator torchvision::nms does not exist"))


def test_import_torchvision_datasets_transforms_models_in_a_fresh_interpreter():
    # A fresh interpreter: whether the shim is needed depends on what was imported before.
    code = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from ghostsys._compat import import_torchvision
            tv = import_torchvision()
            tv2 = import_torchvision()
        import torchvision.datasets, torchvision.transforms.v2
        from torchvision.datasets import ImageFolder, CIFAR10, MNIST
        model = tv.models.resnet18(num_classes=3).eval()
        out = model(torch.zeros(2, 3, 32, 32))
        shim = [w for w in caught if "torchvision's C++ extension" in str(w.message)]
        loaded = tv.extension._has_ops()
        import json
        print(json.dumps({"same": tv is tv2, "shape": list(out.shape), "warned": len(shim), "ext": loaded}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["same"] and got["shape"] == [2, 3]
    # Warn exactly once when the extension cannot load; never when it can (the shim is not used then).
    assert got["warned"] == (0 if got["ext"] else 1)
