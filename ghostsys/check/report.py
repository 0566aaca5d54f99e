"""Equivalence-check rows: tolerances with their provenance, comparisons, and the report (markdown, JSONL, CSV).

Error measures (DESIGN §3): ``max_abs = max|got - ref|`` and the norm-wise relative error
``max_rel = max|got - ref| / max(max|ref|, tiny)``; a dict of tensors (grads, weights, buffers)
counts as one vector, and the note names the tensor with the largest error. Integer tensors
(``num_batches_tracked``) must match exactly. A NEGATIVE CONTROL row compares things that must
differ; it passes when ``max_rel > 100 × tol``, so a checker comparing a thing with itself fails.

Tolerances are never fitted: float64 has the analytic 1e-10 below; every other precision's are
derived in the run by ``ghostsys.check.tolerance`` and carry the divergence they came from and the
factor applied, into every row and into check.jsonl.
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
QUANTITIES = ("logits", "loss", "grads", "weights", "buffers")
F64_TOL = 1e-10
F64_WHY = ("implementations differ only in summation order: float64 roundoff 1.1e-16 over <=1e4-term "
           "reductions, amplified by 1/sqrt(var), stays near 1e-13; observed 6e-16..4e-14 (reference vs "
           "nn.BatchNorm + torch.optim.SGD, 3 steps). 1e-10 leaves >1000x for deeper nets and is still "
           "8 orders below what G_M changes (full BatchNorm vs G_M=4: ~0.5)")


@dataclass(frozen=True)
class Tolerance:
    """A relative tolerance and where it came from.

    source: ``analytic`` (float64: a bound from analysis, no measurement), ``derived`` (``factor`` ×
    ``divergence``, the largest divergence of the reference in this precision from itself in float64
    over the ``draws``), or ``floor`` (``factor`` × the precision's roundoff floor, when every draw
    diverged less).
    """

    quantity: str
    precision: str
    tol: float
    source: str
    divergence: float = math.nan
    factor: float = math.nan
    draws: tuple[tuple[str, float], ...] = ()
    label: str = ""  # what it was derived for, e.g. "buffers: per-rank sequential (rank 1)"
    why: str = ""

    def widened(self, by: float, why: str) -> "Tolerance":
        """The same derivation with `by` × the factor (e.g. 2: both sides are runs at this precision)."""
        if self.source == "analytic":
            return self  # 1e-10 already leaves > 1000x over two float64 runs' summation-order differences
        return dataclasses.replace(self, tol=self.tol * by, factor=self.factor * by, why=f"{self.why}; x{by:g}: {why}")


def analytic(quantity: str, precision: str = "float64") -> Tolerance:
    """The analytic tolerance of `quantity` (logits, loss, grads, weights, buffers): float64 only."""
    if precision != "float64":
        raise KeyError(f"no analytic tolerance for {precision}: its tolerances are derived in the run "
                       "(ghostsys.check.tolerance.derive)")
    if quantity not in QUANTITIES:
        raise KeyError(f"no tolerance for {quantity!r}; known: {', '.join(QUANTITIES)}")
    return Tolerance(quantity, "float64", F64_TOL, "analytic", why=F64_WHY)


TensorLike = Union[Tensor, Mapping[str, Tensor]]


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
    divergence: float = math.nan  # what tol was derived from (NaN: analytic)
    factor: float = math.nan  # tol = factor × divergence (or × unit roundoff when tol_source is "floor")
    tol_source: str = ""  # analytic, derived, floor
    verdict: str = ""  # ok, FAIL; controls: differs, SAME; resolution statements below float64 also: weak, unresolved
    ratio: float = math.nan  # max_rel / tol: the margin

    @property
    def is_control(self) -> bool:
        """True for a negative-control row."""
        return self.section == "control"

    @property
    def counts(self) -> bool:
        """False for a resolution statement this precision cannot settle clearly (reported, not a verdict)."""
        return self.verdict not in ("weak", "unresolved")


def _flat(x: TensorLike) -> Tensor:
    return torch.as_tensor(x).detach().cpu().double().reshape(-1)


def errors(got: TensorLike, ref: TensorLike) -> tuple[float, float, str]:
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
        parts = {k: errors(got[k], ref[k]) for k in ref}
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


def compare(name: str, got: TensorLike, ref: TensorLike, tol: Tolerance, *, section: str | None = None,
            mode: str = "", engine: str = "", factorization: str = "", policy: str | None = None,
            note: str = "", control: bool = False, resolution: bool = False, quantity: str | None = None) -> Row:
    """A Row comparing got with ref under `tol` (an analytic or derived Tolerance).

    A control (``control=True``) passes when it differs by > CONTROL_FACTOR × tol. A failed control
    with ``resolution=True`` at a derived precision is a statement about the precision, not a broken
    checker: *weak* when it still differs by more than tol (a difference this size would fail a row,
    with a thin margin), *unresolved* when not ("at this precision these cannot be told apart"); both
    are stated in the report. Under float64 such a control fails like any other.
    """
    quantity = quantity or name
    max_abs, max_rel, why = errors(got, ref)
    if control:
        passed = bool(max_rel > CONTROL_FACTOR * tol.tol)
        verdict = "differs" if passed else "SAME"
        if not passed and resolution and tol.source != "analytic":
            verdict = "weak" if max_rel > tol.tol else "unresolved"
        section = "control"
        why = f"negative control: passes when it differs by > {CONTROL_FACTOR:g}× tol" + (f"; {why}" if why else "")
    else:
        passed = bool(max_rel <= tol.tol)
        verdict = "ok" if passed else "FAIL"
        section = section or {"logits": "forward", "loss": "forward"}.get(quantity, quantity)
    return Row(section, mode, engine, factorization, name, policy, max_abs, max_rel, tol.tol, passed,
               "; ".join(x for x in (note, why) if x), tol.divergence, tol.factor, tol.source, verdict,
               max_rel / tol.tol if tol.tol > 0 else math.inf)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.2e}"
    return "" if v is None else str(v).replace("|", "\\|")


_RESULT = {"ok": "ok", "FAIL": "FAIL", "differs": "differs", "SAME": "SAME (control failed)",
           "weak": f"differs, by < {CONTROL_FACTOR:g}x tol", "unresolved": "cannot tell apart at this precision"}


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table: error, tolerance, the divergence and factor it came from, result."""
    cols = ["section", "mode", "engine", "factorization", "quantity", "policy", "max_abs", "max_rel", "tol",
            "divergence", "factor"]
    head = cols + ["err/tol", "result", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [getattr(r, c) for c in cols] + [r.ratio, _RESULT.get(r.verdict, r.verdict), r.note]
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def tolerance_table(tols: Sequence[Tolerance]) -> str:
    """The tolerances used, each with its source, the divergence of every draw, the factor and why."""
    lines = ["| precision | for | tol | source | divergence (max) | draws | factor | why |", "|" + "---|" * 8]
    for t in tols:
        draws = "; ".join(f"{k}: {v:.2e}" for k, v in t.draws)
        lines.append(f"| {t.precision} | {_fmt(t.label or t.quantity)} | {t.tol:.2e} | {t.source} | {_fmt(t.divergence)} "
                     f"| {_fmt(draws)} | {_fmt(t.factor)} | {_fmt(t.why)} |")
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
    """Counts of comparisons and controls; all_passed (comparisons) and control_ok (every counted control
    differs, and at least one control tells G_M = 1 from the target).

    Unresolved rows (a resolution statement this precision cannot settle) are counted apart and
    decide neither. Where every control is a resolution statement (bf16), control_ok needs one that
    differs by more than its tolerance (``weak``): then the check at least tells the two apart.
    """
    counted = [r for r in rows if r.counts]
    comps = [r for r in counted if not r.is_control]
    ctrls = [r for r in counted if r.is_control]
    tells = [r for r in rows if r.is_control and r.verdict in ("differs", "weak")]
    return {"rows": len(rows), "comparisons": len(comps), "comparisons_failed": sum(not r.passed for r in comps),
            "controls": len(ctrls), "controls_failed": sum(not r.passed for r in ctrls),
            "weak": sum(r.verdict == "weak" for r in rows), "unresolved": sum(r.verdict == "unresolved" for r in rows),
            "all_passed": bool(comps) and all(r.passed for r in comps),
            "control_ok": bool(tells) and all(r.passed for r in ctrls),
            # the margins on both sides: how close correct rows came to their tolerance, controls and
            # must-differ statements to theirs (err/tol; a control needs > CONTROL_FACTOR), failures
            "max_ratio_ok": _most(max, [r.ratio for r in counted if r.verdict == "ok"]),
            "min_ratio_control": _most(min, [r.ratio for r in counted if r.verdict in ("differs", "SAME")]),
            "max_ratio_failed": _most(max, [r.ratio for r in counted if r.verdict == "FAIL"])}


def _most(f, xs: list[float]) -> float | str | None:
    """f over the ratios; "inf" (strict JSON has none) when only infinite ones exist (e.g. counters differ)."""
    finite = [x for x in xs if math.isfinite(x)]
    return f(finite) if finite else ("inf" if xs else None)


def exit_code(rows: Sequence[Row], injected: bool = False) -> int:
    """0 when every comparison passed and every control differed; bit 1: a comparison failed (or none
    ran); bit 2: a control failed to differ (or none told G_M = 1 from the target, so nothing shows the
    check can fail);
    bit 4: a fault was injected and NO comparison caught it (at this precision the check cannot tell
    it from correct code -- never a silent pass)."""
    s = summary(rows)
    code = (0 if s["all_passed"] else 1) | (0 if s["control_ok"] else 2)
    if injected and not s["comparisons_failed"]:
        code |= 4
    return code


def render(rows: Sequence[Row], tols: Sequence[Tolerance], timings: Sequence[dict], code: int, *,
           inject: str = "", precision: str = "", notes: Sequence[str] = ()) -> str:
    """The whole printed report: comparisons, running statistics in words, tolerances, times, verdict.

    `notes`: lines about the precision itself, printed before the per-row NOTEs."""
    facts = [r for r in rows if r.section == "facts"]
    out = ["\n## Comparisons\n", markdown_table([r for r in rows if r.section != "facts"]),
           "\n## Running statistics, in words\n"]
    words = {"ok": "holds", "differs": "holds", "weak": f"holds, by < {CONTROL_FACTOR:g}x tol at {precision}",
             "unresolved": f"CANNOT TELL APART at {precision}"}
    for r in facts:
        out.append(f"- {r.quantity}: measured max rel. difference {r.max_rel:.2e}, {r.policy}, tol {r.tol:.1e} "
                   f"-> {words.get(r.verdict, 'DOES NOT HOLD')}")
    out += ["\n## Tolerances\n", tolerance_table(tols),
            "\n## Time per variant (s)\n", "\n".join(f"- {t['variant']}: {t['seconds']}" for t in timings), ""]
    s = summary(rows)
    out += [f"NOTE: {n}" for n in notes]
    unresolved = [r for r in rows if not r.counts]
    for r in unresolved:
        what = r.note.split(";")[0] if r.section == "facts" else f"{r.quantity} of {r.factorization}"
        how = ("the check CANNOT TELL these apart" if r.verdict == "unresolved" else
               f"these differ by only {r.ratio:.3g}x the tolerance (a control needs {CONTROL_FACTOR:g}x)")
        out.append(f"NOTE: at {precision} {how}: {what} (differ by {r.max_rel:.2e}; tolerance {r.tol:.2e} = "
                   f"{r.factor:g} x divergence {r.divergence:.2e}); a fault of this size would "
                   + ("pass unseen" if r.verdict == "unresolved"
                      else f"fail its rows, but by less than the {CONTROL_FACTOR:g}x a control demands"))
    clearest = _most(max, [r.ratio for r in rows if r.is_control])
    ctrl = (f"smallest err/tol among controls {_fmt(s['min_ratio_control'])} (must exceed {CONTROL_FACTOR:g})"
            if s["controls"] else f"every control is a resolution statement at {precision}, the clearest at err/tol "
            f"{_fmt(clearest)} (one must exceed 1)")
    out.append(f"margins: largest err/tol among passing comparisons {_fmt(s['max_ratio_ok'])}; {ctrl}"
               + (f"; largest err/tol among failed rows {_fmt(s['max_ratio_failed'])}" if s["max_ratio_failed"] else ""))
    caught = [r for r in rows if r.counts and not r.is_control and not r.passed]
    if code & 4:
        out.append(f"INCONCLUSIVE: --inject {inject} was NOT caught: no comparison exceeded its tolerance, so at "
                   f"{precision} the check cannot tell this fault from correct code")
    elif inject and caught:
        out.append(f"FAIL (as it must): --inject {inject} was caught by {len(caught)} row(s), e.g. "
                   f"{caught[0].quantity} of {caught[0].factorization} at {caught[0].ratio:.3g}x its tolerance")
    else:
        out.append(f"{'PASS' if code == 0 else 'FAIL'}: {s['comparisons']} comparisons "
                   f"({s['comparisons_failed']} failed), {s['controls']} controls ({s['controls_failed']} failed)"
                   + (f", {s['weak'] + s['unresolved']} statements not clearly resolved at {precision} (NOTEs above)"
                      if s["weak"] or s["unresolved"] else ""))
    return "\n".join(out)
