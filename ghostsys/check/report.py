"""Equivalence-check rows: stated tolerances, comparisons, and the report (markdown, JSONL, CSV).

Error measures (DESIGN §3): ``max_abs = max|got - ref|`` and the norm-wise relative error
``max_rel = max|got - ref| / max(max|ref|, tiny)``; a dict of tensors (grads, weights, buffers)
counts as one vector, and the note names the tensor with the largest error. Integer tensors
(``num_batches_tracked``) must match exactly. A NEGATIVE CONTROL row compares things that must
differ; it passes when ``max_rel > 100 × tol``, so a checker comparing a thing with itself fails.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

_TINY = torch.finfo(torch.float64).tiny  # keeps an all-zero reference from dividing by 0
CONTROL_FACTOR = 100.0  # a control must differ by this many tolerances to count as "clearly"
_F64_WHY = ("implementations differ only in summation order: float64 roundoff 1.1e-16 over <=1e4-term "
            "reductions, amplified by 1/sqrt(var), stays near 1e-13; observed 6e-16..4e-14 (reference vs "
            "nn.BatchNorm + torch.optim.SGD, 3 steps). 1e-10 leaves >1000x for deeper nets and is still "
            "8 orders below what G_M changes (full BatchNorm vs G_M=4: ~0.5)")

# The ONE table of tolerances (relative, norm-wise). float32 values sit at the level that reordering
# sums explains: unit roundoff 6e-8, reductions over up to ~1e4 terms (M·H·W), blocked/pairwise sums
# growing like sqrt(n)·u, amplified by 1/sqrt(var+eps). "Observed" numbers are float32 (reference
# and nn.BatchNorm + torch.optim.SGD) against the float64 reference on a conv-BN CNN, M = 64..256,
# 16x16..24x24 inputs, G_M in {1, 4}, 3 SGD steps at lr 0.1, momentum 0.9, wd 5e-4.
# GPU runs must disable TF32 (it rounds matmul inputs to 10 bits, ~1e-3): these assume IEEE float32.
TOLERANCES: dict[str, dict[str, tuple[float, str]]] = {
    "float64": {q: (1e-10, _F64_WHY) for q in ("logits", "loss", "grads", "weights", "buffers")},
    "float32": {
        "logits": (1e-5, "per-channel sums of <=1e4 terms (sqrt(n)·u ~ 6e-6) through a few layers, "
                         "amplified by 1/sqrt(var); observed <= 3e-6"),
        "loss": (1e-5, "mean over M of the log-softmax of the logits: inherits their error, adds none"),
        "grads": (1e-4, "backward through a norm subtracts sums of similar size (mean(g), mean(g·x̂)): "
                        "cancellation costs about one digit over the forward; observed <= 2.2e-5"),
        "weights": (1e-3, "each step adds lr x the gradient error, and later steps see activations of the "
                          "already-perturbed weights, so errors compound with k; observed <= 8e-5 at k = 3"),
        "buffers": (1e-4, "EMAs of group moments of activations computed with the steps' weights: "
                          "roundoff of the moments (~1e-6) plus the weights' drift; observed <= 4e-7"),
    },
}

TensorLike = Union[Tensor, Mapping[str, Tensor]]


def tolerance(quantity: str, dtype: torch.dtype | str) -> tuple[float, str]:
    """(relative tolerance, why) for a quantity (logits, loss, grads, weights, buffers) and dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in TOLERANCES:
        raise KeyError(f"no tolerances for dtype {name}; known: {', '.join(TOLERANCES)}")
    if quantity not in TOLERANCES[name]:
        raise KeyError(f"no tolerance for {quantity!r}; known: {', '.join(TOLERANCES[name])}")
    return TOLERANCES[name][quantity]


@dataclass
class Row:
    """One comparison (or negative control) of the equivalence report."""

    section: str  # forward, grads, weights, buffers, control
    mode: str
    engine: str
    factorization: str
    quantity: str
    policy: str | None
    max_abs: float
    max_rel: float
    tol: float
    passed: bool  # for a control: it differs by more than CONTROL_FACTOR × tol
    note: str = ""

    @property
    def is_control(self) -> bool:
        """True for a negative-control row."""
        return self.section == "control"


def _flat(x: TensorLike) -> Tensor:
    return torch.as_tensor(x).detach().cpu().double().reshape(-1)


def _errors(got: TensorLike, ref: TensorLike) -> tuple[float, float, str]:
    """(max abs, norm-wise relative error, note naming the worst entry or the mismatch).

    A dict is ONE vector scaled by its largest reference entry, not tensor by tensor: some true
    values are structurally zero (the gradient of a conv bias feeding BatchNorm), and a per-tensor
    ratio would then divide roundoff by roundoff.
    """
    if isinstance(ref, Mapping) or isinstance(got, Mapping):
        if not (isinstance(ref, Mapping) and isinstance(got, Mapping)) or set(got) != set(ref):
            missing = sorted(set(ref) - set(got)) if isinstance(got, Mapping) else []
            extra = sorted(set(got) - set(ref)) if isinstance(got, Mapping) and isinstance(ref, Mapping) else []
            return math.inf, math.inf, f"names differ: missing {missing[:3]}, extra {extra[:3]}"
        parts = {k: _errors(got[k], ref[k]) for k in ref}
        bad = [f"{k}: {why}" for k, (_, _, why) in parts.items() if why]
        if bad:
            return math.inf, math.inf, "; ".join(bad[:3])
        worst = max(parts, key=lambda k: parts[k][0] if parts[k][0] == parts[k][0] else math.inf, default="")
        max_abs = max((a for a, _, _ in parts.values()), default=0.0)
        if any(a != a for a, _, _ in parts.values()):
            max_abs = math.nan
        scale = max([float(_flat(r).abs().max()) for r in ref.values()
                     if torch.as_tensor(r).numel() and torch.as_tensor(r).is_floating_point()] + [_TINY])
        return max_abs, max_abs / scale, f"largest abs error in {worst}" if worst and max_abs > 0 else ""
    got_t, ref_t = torch.as_tensor(got).detach().cpu(), torch.as_tensor(ref).detach().cpu()
    if got_t.shape != ref_t.shape:
        return math.inf, math.inf, f"shape {tuple(got_t.shape)} != {tuple(ref_t.shape)}"
    if got_t.numel() == 0:
        return 0.0, 0.0, ""
    if not got_t.is_floating_point() and not ref_t.is_floating_point():
        # Counters (num_batches_tracked) count updates: any difference is a wrong policy.
        return (0.0, 0.0, "") if torch.equal(got_t, ref_t) else (math.inf, math.inf, "integers differ")
    a = float((_flat(got_t) - _flat(ref_t)).abs().max())
    return a, a / max(float(_flat(ref_t).abs().max()), _TINY), ""


def compare(name: str, got: TensorLike, ref: TensorLike, dtype: torch.dtype | str, *, section: str | None = None,
            mode: str = "", engine: str = "", factorization: str = "", policy: str | None = None,
            note: str = "", control: bool = False, quantity: str | None = None) -> Row:
    """A Row comparing got with ref under the stated tolerance of `quantity` (default: name)."""
    quantity = quantity or name
    tol, _ = tolerance(quantity, dtype)
    max_abs, max_rel, why = _errors(got, ref)
    if control:
        passed = bool(max_rel > CONTROL_FACTOR * tol)
        section = "control"
        why = f"negative control: passes when it differs by > {CONTROL_FACTOR:g}× tol" + (f"; {why}" if why else "")
    else:
        passed = bool(max_rel <= tol)
        section = section or {"logits": "forward", "loss": "forward"}.get(quantity, quantity)
    return Row(section, mode, engine, factorization, name, policy, max_abs, max_rel, tol, passed,
               "; ".join(x for x in (note, why) if x))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2e}"
    return "" if v is None else str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table, controls marked as such."""
    cols = ["section", "mode", "engine", "factorization", "quantity", "policy", "max_abs", "max_rel", "tol", "result", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        result = ("differs" if r.passed else "SAME (control failed)") if r.is_control else ("ok" if r.passed else "FAIL")
        vals = [*(getattr(r, c) for c in cols[:9]), result, r.note]
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def tolerance_table(dtypes: Sequence[str] = ("float64", "float32")) -> str:
    """The TOLERANCES table as markdown, with the reason for each number."""
    lines = ["| dtype | quantity | rtol | why |", "|---|---|---|---|"]
    for d in dtypes:
        for q, (tol, why) in TOLERANCES[d].items():
            lines.append(f"| {d} | {q} | {tol:.0e} | {_fmt(why)} |")
    return "\n".join(lines)


def _jsonable(v: object) -> object:
    # Strict JSON has no NaN/inf: write them as null (CSV keeps them; pandas reads "inf"/"nan").
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_rows(rows: Sequence[Row], run_dir: str | Path) -> tuple[Path, Path]:
    """Write check.jsonl (one object per row) and check.csv (pd.read_csv in one call) to run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dicts = [dataclasses.asdict(r) for r in rows]
    jsonl, csv_path = run_dir / "check.jsonl", run_dir / "check.csv"
    with open(jsonl, "w") as f:
        for d in dicts:
            f.write(json.dumps({k: _jsonable(v) for k, v in d.items()}) + "\n")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
        w.writeheader()
        w.writerows(dicts)
    return jsonl, csv_path


def summary(rows: Sequence[Row]) -> dict[str, object]:
    """Counts of comparisons and controls; all_passed (comparisons) and control_ok (>= 1 control, all differ)."""
    comps = [r for r in rows if not r.is_control]
    ctrls = [r for r in rows if r.is_control]
    return {"rows": len(rows), "comparisons": len(comps), "comparisons_failed": sum(not r.passed for r in comps),
            "controls": len(ctrls), "controls_failed": sum(not r.passed for r in ctrls),
            "all_passed": bool(comps) and all(r.passed for r in comps),
            "control_ok": bool(ctrls) and all(r.passed for r in ctrls)}


def exit_code(rows: Sequence[Row]) -> int:
    """0 when every comparison passed and every control differed; bit 1: a comparison failed (or none
    ran); bit 2: a control failed to differ (or there was none, so nothing shows the check can fail)."""
    s = summary(rows)
    return (0 if s["all_passed"] else 1) | (0 if s["control_ok"] else 2)
