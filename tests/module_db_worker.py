"""Run PyTorch's own BatchNorm module tests (torch.testing._internal.common_modules.module_db) on ghost layers.

Run by tests/test_module_db.py in a subprocess: importing torch.testing._internal changes global torch
state (it calls torch.backends.disable_global_flags() and patches TorchScript call hooks), which must
not leak into the rest of the suite. Prints one JSON line per case:
{"layer", "module", "case", "dtype", "training", "ok", "why"}.

Every ModuleInfo whose module is nn.BatchNorm{1,2,3}d is used, so cases PyTorch adds are picked up.
For each case the real BatchNorm and the layer under test are built from the same constructor
arguments (plus the layer's own keyword), given the same randomized parameters and buffers through
a strict load_state_dict (so their state-dict keys must match), run forward twice (the second
forward sees the running statistics the first one updated) and backward; then outputs, input and
parameter gradients and buffers are compared. Error inputs must raise what BatchNorm raises.

Tolerance: none (bit equality). With one ghost group GhostBatchNorm makes the same F.batch_norm call
as BatchNorm with the same arguments (and NoisyBatchNorm with noise_std=0 too), and the CPU kernel is
deterministic; any difference is a difference in what is computed. The "ghost2" layer (two ghost
groups) is the negative control: it must fail the training-mode cases.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

from ghostsys.nn import GhostBatchNorm, NoisyBatchNorm, SeqNorm

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LAYERS = {
    "ghost": (lambda *a, **k: GhostBatchNorm(*a, **k, ghost_groups=1), "full"),
    "noisy": (lambda *a, **k: NoisyBatchNorm(*a, **k, noise_std=0.0), "full"),
    # SeqNorm normalizes a different quantity (GroupNorm first): it must accept every argument with
    # BatchNorm's meaning (state-dict keys, shapes, dtypes, what raises), not compute the same numbers.
    "seq": (lambda *a, **k: SeqNorm(*a, **k, channel_groups=1, ghost_groups=1), "structure"),
    "ghost2": (lambda *a, **k: GhostBatchNorm(*a, **k, ghost_groups=2), "full"),  # negative control
}


def _randomize(m: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))


def _run(m: nn.Module, inputs: tuple, seed: int) -> dict:
    """Two forwards and one backward; everything the comparison looks at."""
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out1 = m(*xs)
    out2 = m(*xs)
    gen = torch.Generator().manual_seed(seed)
    got = {"out1": out1.detach(), "out2": out2.detach()}
    if out2.requires_grad:
        g1 = torch.randn(out1.shape, generator=gen, dtype=out1.dtype)
        g2 = torch.randn(out2.shape, generator=gen, dtype=out2.dtype)
        torch.autograd.backward([out1, out2], [g1, g2])
        got.update({f"input{i}.grad": x.grad for i, x in enumerate(xs)})
        got.update({f"{n}.grad": p.grad for n, p in m.named_parameters()})
    got.update({f"buffer {n}": b.detach().clone() for n, b in m.named_buffers()})
    return got


def _same(a: dict, b: dict) -> str:
    if a.keys() != b.keys():
        return f"different things to compare: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        if (a[k] is None) != (b[k] is None):
            return f"{k}: one is None"
        if a[k] is not None:
            try:
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, equal_nan=True)
            except AssertionError as err:
                return f"{k}: {str(err).splitlines()[0]} {str(err).splitlines()[-2:]}"
    return ""


def _structure(ref: nn.Module, new: nn.Module) -> str:
    a = {k: (tuple(v.shape), v.dtype) for k, v in ref.state_dict().items()}
    b = {k: (tuple(v.shape), v.dtype) for k, v in new.state_dict().items()}
    if a != b:
        return f"state dict differs: {a} vs {b}"
    pa = [(n, p.requires_grad) for n, p in ref.named_parameters()]
    pb = [(n, p.requires_grad) for n, p in new.named_parameters()]
    return "" if pa == pb else f"parameters differ: {pa} vs {pb}"


def _case(info, make, how: str, mi, dtype: torch.dtype, training: bool, seed: int) -> str:
    """'' when the layer behaves as BatchNorm on this module input, else why not."""
    args, kwargs = mi.constructor_input.args, {**mi.constructor_input.kwargs, "device": "cpu", "dtype": dtype}
    ref, new = info.module_cls(*args, **kwargs), make(*args, **kwargs)
    why = _structure(ref, new)
    if why:
        return why
    _randomize(ref, seed)
    new.load_state_dict(ref.state_dict(), strict=True)
    ref.train(training)
    new.train(training)
    inputs = mi.forward_input.args
    a = _run(ref, inputs, seed)
    b = _run(new, inputs, seed)
    if how == "structure":
        return "" if a["out2"].shape == b["out2"].shape else f"output shape {b['out2'].shape} != {a['out2'].shape}"
    return _same(a, b)


def _outcome(fn) -> tuple[type | None, str]:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 -- the type is what is compared
        return type(err), str(err)
    return None, ""


def _error_case(info, make, err_input, training: bool) -> str:
    """'' when the layer raises (or not) exactly as BatchNorm does on this error input."""
    import re

    mi = err_input.module_error_input
    dtype = next((x.dtype for x in mi.forward_input.args if isinstance(x, torch.Tensor)), None)
    args, kwargs = mi.constructor_input.args, {**mi.constructor_input.kwargs, "dtype": dtype}
    outcomes = []
    for build in (info.module_cls, make):
        def go(build=build):
            m = build(*args, **kwargs).train(training)
            if err_input.error_on == ModuleErrorEnum.FORWARD_ERROR:
                m(*mi.forward_input.args)
        outcomes.append(_outcome(go))
    (ta, ma), (tb, mb) = outcomes
    if ta is not tb:
        return f"BatchNorm raised {ta and ta.__name__}, the layer {tb and tb.__name__}: {mb}"
    if ta is not None and re.search(err_input.error_regex, ma) and not re.search(err_input.error_regex, mb):
        return f"message {mb!r} does not match {err_input.error_regex!r}"
    return ""


def main() -> int:
    """Print one JSON line per (layer, case, dtype, mode)."""
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronization
    infos = [i for i in module_db if i.module_cls in BATCHNORMS]
    for layer, (make, how) in LAYERS.items():
        for info in infos:
            for dtype in info.supported_dtypes("cpu"):
                for training in (True, False):
                    cases = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
                    for n, mi in enumerate(cases):
                        try:
                            why = _case(info, make, how, mi, dtype, training, seed=n)
                        except Exception as err:  # noqa: BLE001 -- a case that crashes is a failed case
                            why = f"raised {type(err).__name__}: {err}"
                        print(json.dumps({"layer": layer, "module": info.name, "case": mi.desc or f"#{n}",
                                          "dtype": str(dtype), "training": training, "ok": not why, "why": why}))
                    errors = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                                           training=training)
                    for n, e in enumerate(errors):
                        why = _error_case(info, make, e, training)
                        print(json.dumps({"layer": layer, "module": info.name, "case": f"error {n}: {e.error_regex}",
                                          "dtype": str(dtype), "training": training, "ok": not why, "why": why}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
