#!/usr/bin/env python
"""Audit ``ghostsys.nn.convert`` on real timm and torchvision models: does it keep what each model computes?

    python benchmarks/convert_audit.py                      # every model below, markdown table
    python benchmarks/convert_audit.py --models timm:dpn68,tv:resnet18 --size 128

Per model: the BatchNorm layers (every ``torch.nn.modules.batchnorm._BatchNorm``), how ``convert(model,
"ghost", ghost_groups=1)`` treated them, the parameter count before and after, and the largest absolute
difference of the eval-mode output after conversion (with one ghost group GhostBatchNorm is BatchNorm, so
anything but 0 is a change of function). Columns:

* plain: a layer with no behaviour beyond BatchNorm's, swapped for a ghost layer;
* kept: a BatchNorm subclass with extra behaviour (timm's BatchNormAct2d: drop + act) whose
  replacement still applies the original's ``act`` module;
* DROPPED: such a layer swapped for a ghost layer without it (silently changed function);
* refused: the conversion raised, naming these layers' class as one it cannot swap faithfully (the
  model is left untouched: the other BatchNorms of the row, e.g. ones inside a refused layer, too).

Written against the public API only (``ghostsys.nn.convert``), so the same script audits any revision:
run it with another checkout first on ``PYTHONPATH`` to audit that one. Models are randomly initialized
(seed 0) and their BatchNorm running statistics and affine randomized, so eval really uses them. Not a
test: it builds large models (densenet121, cspdarknet53) at their default input size on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import sys
import time
import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ghostsys._compat import import_torchvision

MODELS = ("timm:efficientnet_b0", "timm:mobilenetv3_small_100", "timm:densenet121", "timm:regnety_002",
          "timm:cspdarknet53", "timm:rexnet_100", "timm:ghostnet_100", "timm:mixnet_s", "timm:dpn68",
          "timm:resnet10t+bias=False", "timm:efficientnet_b0+splitbn",
          "tv:resnet18", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:densenet121", "tv:regnet_y_400mf",
          "tv:shufflenet_v2_x0_5", "tv:mnasnet0_5")
_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def build(spec: str) -> tuple[nn.Module, int]:
    """A randomly initialized model and its default input size. `+bias=False`: BatchNorm(bias=False)
    as norm_layer; `+splitbn`: timm's convert_splitbn_model (AdvProp's auxiliary BatchNorms)."""
    source, _, rest = spec.partition(":")
    name, _, variant = rest.partition("+")
    torch.manual_seed(0)
    if source == "tv":
        tv = import_torchvision()
        size = 299 if name == "inception_v3" else 224
        return tv.models.get_model(name, weights=None, num_classes=1000), size
    import_torchvision()
    import timm

    kw = {"norm_layer": functools.partial(nn.BatchNorm2d, bias=False)} if variant == "bias=False" else {}
    model = timm.create_model(name, pretrained=False, **kw)
    if variant == "splitbn":
        model = timm.layers.convert_splitbn_model(model, num_splits=2)
    return model, model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]


def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Random affine and running statistics for every BatchNorm (fresh ones would be near identities)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0, 0.2, generator=gen)


def audit(spec: str, batch: int, size: int | None) -> dict:
    """One row: what convert did to each BatchNorm, parameter counts, eval-output difference."""
    from ghostsys.nn import convert

    t0 = time.perf_counter()
    model, default_size = build(spec)
    randomize_norms(model)
    model.eval()
    s = size or default_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(2))
    bns = {p: m for p, m in model.named_modules() if isinstance(m, _BatchNorm)}
    row = {"model": spec, "input": f"{batch}x3x{s}x{s}", "bn": len(bns), "plain": 0, "kept": 0, "dropped": 0,
           "refused": 0, "params_before": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        want = model(x)
    row["max_abs_y"] = want.abs().max().item()
    try:
        new = convert(copy.deepcopy(model), "ghost", ghost_groups=1)
    except Exception as err:  # noqa: BLE001 -- a refusal is a result here
        def named(m: nn.Module) -> bool:  # the error names each refused class as "<module>.<qualname> at <paths>"
            return f"{type(m).__module__}.{type(m).__qualname__} at" in str(err)

        row.update(refused=sum(named(m) for m in bns.values()), params_after=row["params_before"],
                   max_abs_diff=float("nan"), note=f"model untouched; {type(err).__name__}: {str(err)[:150]}")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    after = dict(new.named_modules())
    for path, old in bns.items():
        if type(old) in _PLAIN:
            row["plain"] += 1
        elif "act" in getattr(after.get(path), "_modules", {}) and type(after[path].act) is type(old.act):
            row["kept"] += 1
        else:
            row["dropped"] += 1
    row["params_after"] = sum(p.numel() for p in new.parameters())
    with torch.no_grad():
        row["max_abs_diff"] = (new.eval()(x) - want).abs().max().item()
    row["note"] = ""
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def markdown(rows: list[dict]) -> str:
    """The audit as a markdown table."""
    head = ("| model | input | BN layers | plain | kept (drop+act) | DROPPED | refused | params before | params after "
            "| max abs diff (eval) | max abs output | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['bn']} | {r['plain']} | {r['kept']} | {r['dropped']} | "
                     f"{r['refused']} | {r['params_before']:,} | {r['params_after']:,} | {r['max_abs_diff']:.3g} | "
                     f"{r['max_abs_y']:.3g} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the audit table (and the versions it ran with)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated tv:<name> / timm:<name>[+variant]")
    parser.add_argument("--batch", type=int, default=2, help="samples in the eval batch")
    parser.add_argument("--size", type=int, default=0, help="input height/width (0 = the model's default)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import ghostsys

    rows = []
    for spec in args.models.split(","):
        rows.append(audit(spec, args.batch, args.size or None))
        print(f"{spec}: {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    import timm

    print(f"ghostsys from {ghostsys.__file__}; torch {torch.__version__}, timm {timm.__version__}, "
          f"torchvision {import_torchvision().__version__}, Python {platform.python_version()}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
