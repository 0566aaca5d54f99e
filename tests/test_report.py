"""Report rows: error measures, tolerances and their provenance, markdown/JSONL/CSV output, and the exit-code logic."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from ghostsys.check.report import (Row, Tolerance, analytic, compare, exit_code, markdown_table, render, summary,
                                   tolerance_table, write_rows)

# A derived float32 tolerance as ghostsys.check.tolerance hands them out (3 x the largest of its draws).
F32 = Tolerance("grads", "float32", 3e-5, "derived", 1e-5, 3.0, (("as written", 4e-6), ("reordered", 1e-5)),
                "grads", "3 x the largest divergence")


def _rows() -> list[Row]:
    x = torch.linspace(-2, 2, 50, dtype=torch.float64)
    return [
        compare("logits", x + 1e-13, x, analytic("logits"), mode="accumulate", engine="accelerate", factorization="1x8x1"),
        compare("grads", {"w": x, "b": torch.zeros(3)}, {"w": x, "b": torch.zeros(3)}, analytic("grads")),
        compare("buffers", {"bn.running_var": x.abs() + 1, "bn.num_batches_tracked": torch.tensor(4)},
                {"bn.running_var": x.abs() + 1, "bn.num_batches_tracked": torch.tensor(4)}, analytic("buffers"),
                policy="sequential"),
        compare("logits", x * 1.1, x, analytic("logits"), control=True, note="G_M=1 vs G_M=4"),
    ]


def test_error_measure_is_norm_wise_relative():
    x = torch.tensor([1.0, -4.0, 0.0], dtype=torch.float64)
    row = compare("logits", x + torch.tensor([0.0, 0.0, 2e-12], dtype=torch.float64), x, analytic("logits"))
    # max|got-ref| = 2e-12 against max|ref| = 4: relative 5e-13, although the entry itself was 0.
    assert row.max_abs == pytest.approx(2e-12) and row.max_rel == pytest.approx(5e-13) and row.passed
    assert row.ratio == pytest.approx(5e-3) and row.verdict == "ok"
    assert not compare("logits", x * (1 + 1e-9), x, analytic("logits")).passed  # 1e-9 > the float64 1e-10


def test_dicts_names_shapes_integers_and_nan_fail():
    a = {"w": torch.ones(3)}
    assert not compare("grads", {"v": torch.ones(3)}, a, F32).passed
    assert not compare("grads", {"w": torch.ones(4)}, a, F32).passed
    assert not compare("grads", {"w": torch.tensor([1.0, math.nan, 1.0])}, a, F32).passed
    n = {"bn.num_batches_tracked": torch.tensor(3)}
    assert not compare("buffers", {"bn.num_batches_tracked": torch.tensor(4)}, n, analytic("buffers")).passed
    assert compare("buffers", n, n, analytic("buffers")).passed


def test_float64_is_analytic_and_nothing_else_is():
    t = analytic("grads")
    assert (t.tol, t.source, t.precision) == (1e-10, "analytic", "float64") and "summation order" in t.why
    assert math.isnan(t.divergence) and math.isnan(t.factor)
    with pytest.raises(KeyError, match="derived in the run"):
        analytic("logits", "float32")  # no fixed float32 table exists to fall back on
    with pytest.raises(KeyError, match="known"):
        analytic("activations")


def test_rows_carry_the_divergence_and_factor_their_tolerance_came_from():
    x = torch.ones(10, dtype=torch.float64)
    row = compare("grads", x * (1 + 2e-5), x, F32)
    assert (row.tol, row.divergence, row.factor, row.tol_source) == (3e-5, 1e-5, 3.0, "derived")
    assert row.passed and row.ratio == pytest.approx(2 / 3, rel=1e-3)
    assert not compare("grads", x * (1 + 4e-5), x, F32).passed
    wide = F32.widened(2, "two runs")
    assert (wide.tol, wide.factor, wide.divergence) == (6e-5, 6.0, 1e-5) and "two runs" in wide.why
    f64 = analytic("grads")
    assert f64.widened(2, "two runs") is f64  # 1e-10 already covers two float64 runs
    table = tolerance_table([F32, analytic("logits")])
    assert table.count("\n") == 3 and "reordered: 1.00e-05" in table and "| analytic |" in table


def test_markdown_table_lists_every_row_and_marks_controls():
    rows = _rows()
    md = markdown_table(rows)
    lines = md.splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].startswith("| section")
    assert "| tol | divergence | factor | err/tol |" in lines[0]
    assert "| control |" in lines[-1] and "differs" in lines[-1] and "negative control" in lines[-1]
    assert "accelerate" in lines[2] and "| ok |" in lines[2]


def test_jsonl_and_csv_are_readable_in_one_call(tmp_path):
    rows = _rows() + [compare("grads", {"w": torch.ones(2)}, {"v": torch.ones(2)}, F32)]  # inf errors
    jsonl, csv_path = write_rows(rows, tmp_path / "run")
    df = pd.read_csv(csv_path)
    assert len(df) == len(rows) and list(df.columns) == list(Row.__dataclass_fields__)
    assert df["passed"].tolist() == [r.passed for r in rows] and df["policy"].iloc[2] == "sequential"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]  # strict JSON: inf became null
    assert records[-1]["max_rel"] is None and records[0]["quantity"] == "logits"
    assert (records[-1]["tol"], records[-1]["divergence"], records[-1]["factor"], records[-1]["tol_source"]) == (
        3e-5, 1e-5, 3.0, "derived")  # a derived tolerance is recorded with what it came from
    assert records[0]["divergence"] is None and records[0]["tol_source"] == "analytic"
    assert len(pd.read_json(jsonl, lines=True)) == len(rows)


def test_summary_and_exit_code():
    rows = _rows()
    s = summary(rows)
    assert {k: s[k] for k in ("rows", "comparisons", "comparisons_failed", "controls", "controls_failed", "weak",
                              "unresolved", "all_passed", "control_ok")} == {
        "rows": 4, "comparisons": 3, "comparisons_failed": 0, "controls": 1, "controls_failed": 0, "weak": 0,
        "unresolved": 0, "all_passed": True, "control_ok": True}
    assert s["max_ratio_ok"] == pytest.approx(max(r.ratio for r in rows[:3])) and s["min_ratio_control"] > 100
    assert exit_code(rows) == 0
    x = torch.ones(4, dtype=torch.float64)
    failed = compare("logits", x * 2, x, analytic("logits"))
    same_control = compare("logits", x, x, analytic("logits"), control=True)  # compares a thing with itself
    assert not same_control.passed and "SAME" in markdown_table([same_control])
    assert exit_code(rows + [failed]) == 1
    assert exit_code(rows + [same_control]) == 2
    assert exit_code(rows + [failed, same_control]) == 3
    assert exit_code(rows[:3]) == 2  # no control at all: nothing shows the checker can fail
    assert exit_code([]) == 3


def test_an_injected_fault_no_row_caught_is_never_a_silent_pass():
    rows = _rows()
    assert exit_code(rows, injected=True) == 4  # everything passed although a fault was injected
    text = render(rows, [], [], 4, inject="interleaved", precision="float32")
    assert "INCONCLUSIVE: --inject interleaved was NOT caught" in text and "PASS" not in text.splitlines()[-1]
    x = torch.ones(4, dtype=torch.float64)
    caught = rows + [compare("logits", x * 2, x, analytic("logits"))]
    assert exit_code(caught, injected=True) == 1
    assert "FAIL (as it must): --inject interleaved was caught by 1 row" in render(
        caught, [], [], 1, inject="interleaved", precision="float64")


def test_resolution_controls_below_float64_are_stated_not_failed():
    x = torch.ones(8, dtype=torch.float64)
    kw = dict(control=True, resolution=True)
    weak = compare("weights", x * 1.001, x, F32, **kw)  # 1e-3: 33x the tolerance, not 100x
    blind = compare("weights", x * (1 + 1e-5), x, F32, **kw)  # within the tolerance: cannot tell apart
    clear = compare("weights", x * 1.1, x, F32, **kw)
    assert (weak.verdict, blind.verdict, clear.verdict) == ("weak", "unresolved", "differs")
    assert not weak.counts and not blind.counts and clear.counts
    rows = _rows() + [weak, blind, clear]
    s = summary(rows)
    assert (s["weak"], s["unresolved"], s["controls"]) == (1, 1, 2) and exit_code(rows) == 0
    text = render(rows, [F32], [], 0, precision="float32")
    assert "the check CANNOT TELL these apart" in text and "differ by only 33.3x the tolerance" in text
    assert "2 statements not clearly resolved at float32" in text.splitlines()[-1]
    # The same statement under float64's analytic tolerance is a hard control: it fails.
    hard = compare("weights", x, x, analytic("weights"), **kw)
    assert hard.verdict == "SAME" and exit_code(_rows() + [hard]) == 2


def test_where_every_control_is_a_resolution_statement_one_must_still_tell_them_apart():
    """bf16: no control can be held to 100x; the check passes only if one differs by more than its tolerance."""
    x = torch.ones(8, dtype=torch.float64)
    bf = Tolerance("logits", "bf16-autocast", 0.05, "derived", 0.017, 3.0, (("as written", 0.003),), "logits")
    comps = _rows()[:3]
    kw = dict(control=True, resolution=True)
    weak = compare("logits", x * 1.25, x, bf, **kw)  # 5x its tolerance: told apart, not by 100x
    blind = compare("weights", x * 1.01, x, bf, **kw)  # within it
    assert (weak.verdict, blind.verdict) == ("weak", "unresolved")
    s = summary(comps + [weak, blind])
    assert s["controls"] == 0 and s["control_ok"] and exit_code(comps + [weak, blind]) == 0
    assert exit_code(comps + [blind]) == 2  # nothing shows the check can tell G_M = 1 from the target
    text = render(comps + [weak, blind], [bf], [], 0, precision="bf16-autocast", notes=["about the precision"])
    assert "NOTE: about the precision" in text and "the clearest at err/tol 5.00e+00 (one must exceed 1)" in text
    assert "differ by only 5x the tolerance" in text and "the check CANNOT TELL these apart" in text
