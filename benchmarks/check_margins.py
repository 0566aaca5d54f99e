#!/usr/bin/env python
"""The margin on both sides of equivalence checks, from their ``check.jsonl`` (not a test).

    python benchmarks/check_margins.py runs/check-accelerate-ng1-batch-float32 runs/check-*-inject-*

For each check directory (written by ``launch/check.py``: check.jsonl, config.json, summary.json) one
row: the check's own exit code (``summary.json``; under torchrun/deepspeed the launcher reports 1 for any
non-zero rank), and err/tol = max_rel / tol of

* ``max ok``: the LARGEST among rows that passed (comparisons and must-agree statements): how close
  correct code came to its tolerance (< 1, the smaller the safer);
* ``ctrl logits`` / ``ctrl grads``: the first-step negative controls, BatchNorm G_M = 1 vs the target
  (> 100 at float32/float64; stated with their margin at bf16, where one must exceed 1);
* ``ctrl weights`` / ``ctrl buffers``: the same after k steps, resolution statements below float64;
* ``min must-differ``: the SMALLEST among the running-statistics statements that say two things differ;
* ``caught by``: for a run with ``--inject``, the LARGEST err/tol among failed rows (how clearly the fault
  was caught; > 1 caught, none: not caught), and the row.

``inf`` stands for a row whose error has no finite ratio (integer counters differ, names mismatch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _ratio(r: dict) -> float:
    # check.jsonl writes inf/NaN as null: a null ratio with a non-null tolerance means an infinite error.
    return math.inf if r.get("ratio") is None else float(r["ratio"])


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.3g}"


def margins(run_dir: Path) -> dict:
    """One check's margins (see the module docstring) as a dict of plain values."""
    rows = [json.loads(line) for line in (run_dir / "check.jsonl").read_text().splitlines() if line.strip()]
    cfg = json.loads((run_dir / "config.json").read_text())
    summ = json.loads((run_dir / "summary.json").read_text())
    ok = [r for r in rows if r["verdict"] == "ok"]
    worst_ok = max(ok, key=_ratio, default=None)
    ctrl = {r["quantity"]: r for r in rows if r["section"] == "control"}
    differ = [r for r in rows if r["section"] == "facts" and r["policy"].startswith("must differ")]
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    caught = max(failed, key=_ratio, default=None)
    out = {"check": run_dir.name, "precision": summ.get("precision", cfg.get("dtype")), "engine": cfg["engine"],
           "zero": cfg.get("zero_stage", 0), "n_g": summ.get("world_size", cfg.get("world_size")),
           "model": cfg["model"], "k": cfg["steps"], "inject": cfg.get("inject") or "-",
           "exit": summ["exit_code"], "rows": len(rows),
           "max_ok": _ratio(worst_ok) if worst_ok else None,
           "max_ok_row": f"{worst_ok['quantity']} ({worst_ok['mode']}, {worst_ok['factorization']})" if worst_ok else "",
           "min_must_differ": min((_ratio(r) for r in differ), default=None),
           "caught_by": _ratio(caught) if caught else None,
           "caught_row": f"{caught['quantity']} ({caught['mode']}, {caught['factorization']})" if caught else ""}
    for q in ("logits", "grads", "weights", "buffers"):
        r = ctrl.get(q)
        out[f"ctrl_{q}"] = _ratio(r) if r else None
        out[f"ctrl_{q}_verdict"] = r["verdict"] if r else ""
    return out


def table(ms: list[dict]) -> str:
    """The margins as one markdown table."""
    head = ["check", "precision", "engine", "n_g", "inject", "exit", "max ok", "ctrl logits", "ctrl grads",
            "ctrl weights", "ctrl buffers", "min must-differ", "caught by", "max ok row", "caught row"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ms:
        ctrls = [f"{_fmt(m[f'ctrl_{q}'])} {m[f'ctrl_{q}_verdict']}".strip() for q in ("logits", "grads", "weights", "buffers")]
        engine = m["engine"] + (f" z{m['zero']}" if m["engine"] == "deepspeed" else "")
        vals = [m["check"], m["precision"], engine, m["n_g"], m["inject"], m["exit"], _fmt(m["max_ok"]), *ctrls,
                _fmt(m["min_must_differ"]), _fmt(m["caught_by"]), m["max_ok_row"], m["caught_row"]]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the margins of every check directory given; exit 2 naming any that is not one."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="check directories (each with check.jsonl, config.json, summary.json)")
    ap.add_argument("--json", action="store_true", help="one JSON object per check instead of the markdown table")
    args = ap.parse_args(argv)
    bad = [str(d) for d in args.dirs if not all((d / f).is_file() for f in ("check.jsonl", "config.json", "summary.json"))]
    if bad:
        print(f"error: not a check directory (needs check.jsonl, config.json, summary.json): {', '.join(bad)}; "
              "pass the --out of launch/check.py", file=sys.stderr)
        return 2
    ms = [margins(d) for d in args.dirs]
    print("\n".join(json.dumps(m) for m in ms) if args.json else table(ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
