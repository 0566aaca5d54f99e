"""Report rows: error measures, tolerances, markdown/JSONL/CSV output, and the exit-code logic."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from ghostsys.check.report import (TOLERANCES, Row, compare, exit_code, markdown_table, summary, tolerance,
                             tolerance_table, write_rows)


def _rows() -> list[Row]:
    x = torch.linspace(-2, 2, 50, dtype=torch.float64)
    return [
        compare("logits", x + 1e-13, x, torch.float64, mode="accumulate", engine="accelerate", factorization="1x8x1"),
        compare("grads", {"w": x, "b": torch.zeros(3)}, {"w": x, "b": torch.zeros(3)}, torch.float64),
        compare("buffers", {"bn.running_var": x.abs() + 1, "bn.num_batches_tracked": torch.tensor(4)},
                {"bn.running_var": x.abs() + 1, "bn.num_batches_tracked": torch.tensor(4)}, torch.float64,
                policy="sequential"),
        compare("logits", x * 1.1, x, torch.float64, control=True, note="G_M=1 vs G_M=4"),
    ]


def test_error_measure_is_norm_wise_relative():
    x = torch.tensor([1.0, -4.0, 0.0], dtype=torch.float64)
    row = compare("logits", x + torch.tensor([0.0, 0.0, 2e-12], dtype=torch.float64), x, torch.float64)
    # max|got-ref| = 2e-12 against max|ref| = 4: relative 5e-13, although the entry itself was 0.
    assert row.max_abs == pytest.approx(2e-12) and row.max_rel == pytest.approx(5e-13) and row.passed
    assert not compare("logits", x * (1 + 1e-9), x, torch.float64).passed  # 1e-9 > the float64 1e-10


def test_dicts_names_shapes_integers_and_nan_fail():
    a = {"w": torch.ones(3)}
    assert not compare("grads", {"v": torch.ones(3)}, a, "float32").passed
    assert not compare("grads", {"w": torch.ones(4)}, a, "float32").passed
    assert not compare("grads", {"w": torch.tensor([1.0, math.nan, 1.0])}, a, "float32").passed
    n = {"bn.num_batches_tracked": torch.tensor(3)}
    assert not compare("buffers", {"bn.num_batches_tracked": torch.tensor(4)}, n, "float64").passed
    assert compare("buffers", n, n, "float64").passed


def test_tolerances_are_one_table_with_reasons():
    assert tolerance("grads", torch.float64)[0] == 1e-10
    assert tolerance("logits", "float32")[0] == TOLERANCES["float32"]["logits"][0]
    assert all(why for table in TOLERANCES.values() for _, why in table.values())
    with pytest.raises(KeyError):
        tolerance("logits", torch.float16)
    assert tolerance_table().count("\n") == 1 + sum(len(t) for t in TOLERANCES.values())


def test_markdown_table_lists_every_row_and_marks_controls():
    rows = _rows()
    md = markdown_table(rows)
    lines = md.splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].startswith("| section")
    assert "| control |" in lines[-1] and "differs" in lines[-1] and "negative control" in lines[-1]
    assert "accelerate" in lines[2] and "| ok |" in lines[2]


def test_jsonl_and_csv_are_readable_in_one_call(tmp_path):
    rows = _rows() + [compare("grads", {"w": torch.ones(2)}, {"v": torch.ones(2)}, "float64")]  # inf errors
    jsonl, csv_path = write_rows(rows, tmp_path / "run")
    df = pd.read_csv(csv_path)
    assert len(df) == len(rows) and list(df.columns) == list(Row.__dataclass_fields__)
    assert df["passed"].tolist() == [r.passed for r in rows] and df["policy"].iloc[2] == "sequential"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]  # strict JSON: inf became null
    assert records[-1]["max_rel"] is None and records[0]["quantity"] == "logits"
    assert len(pd.read_json(jsonl, lines=True)) == len(rows)


def test_summary_and_exit_code():
    rows = _rows()
    s = summary(rows)
    assert s == {"rows": 4, "comparisons": 3, "comparisons_failed": 0, "controls": 1, "controls_failed": 0,
                 "all_passed": True, "control_ok": True}
    assert exit_code(rows) == 0
    x = torch.ones(4, dtype=torch.float64)
    failed = compare("logits", x * 2, x, torch.float64)
    same_control = compare("logits", x, x, torch.float64, control=True)  # compares a thing with itself
    assert not same_control.passed and "SAME" in markdown_table([same_control])
    assert exit_code(rows + [failed]) == 1
    assert exit_code(rows + [same_control]) == 2
    assert exit_code(rows + [failed, same_control]) == 3
    assert exit_code(rows[:3]) == 2  # no control at all: nothing shows the checker can fail
    assert exit_code([]) == 3
