"""SeqNorm tuning tables: the grid, the sequential strategy's selection (with ties), launch/sweep.py's bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ghostsys.study.sweep import read_table
from ghostsys.study.tuning import candidate_stats, grid_rows, select_best, select_gm, stage1_rows
from launch import sweep
from tests._refusal import assert_refused

BASE = {"dataset": "digits", "model": "simplenet", "batch_size": 256}


def _stats(per_gm: dict[int, list[float]]) -> pd.DataFrame:
    """A synthetic stage-1 table: accuracy in [0, 1] per seed for each G_M."""
    rows = [{"candidate": f"gm{gm}", "effective_gm": gm, "eval_acc": a, "channel_groups": 1}
            for gm, accs in per_gm.items() for a in accs]
    return candidate_stats(pd.DataFrame(rows))


# Means (points) and sample stds: G_M 2: 80.90 (0.14), 4: 81.20 (0.07), 8: 81.40 (best; 0.71), 16: 81.00 (0.57), 32: 79.00.
STAGE1 = {2: [0.808, 0.810], 4: [0.8115, 0.8125], 8: [0.809, 0.819], 16: [0.806, 0.814], 32: [0.789, 0.791]}


def test_sequential_selection_takes_the_largest_that_performs_well():
    stats = _stats(STAGE1)
    assert stats.set_index("gm")["mean"].round(2).to_dict() == {2: 80.9, 4: 81.2, 8: 81.4, 16: 81.0, 32: 79.0}
    pick = select_gm(stats, well_within=0.5, tie_within=0.0)  # well: 8, 4, 2, 16 (>= 80.9); largest 16
    assert pick.value == 16 and pick.table.set_index("gm")["well"].to_dict() == {2: True, 4: True, 8: True, 16: True, 32: False}
    assert select_gm(stats, well_within=0.3).value == 8  # well: 8 (81.4) and 4 (81.2); largest 8
    assert select_gm(stats, well_within=5.0).value == 32  # everything performs well: the largest


def test_sequential_selection_breaks_ties_by_the_lowest_variance():
    stats = _stats(STAGE1)
    # Ties with the largest well-performing G_M (16, 81.0): means within 0.25 points -> 16 and 4 (81.2) and 2 (80.9).
    pick = select_gm(stats, well_within=0.5, tie_within=0.25)
    assert sorted(pick.table[pick.table["tie"]]["gm"]) == [2, 4, 16]
    assert pick.value == 4  # the lowest spread among the ties (0.07 < 0.14 < 0.57)
    tied = _stats({4: [0.80, 0.82], 8: [0.81, 0.81], 16: [0.80, 0.82]})  # the same mean, 8 has no spread
    assert select_gm(tied, well_within=0.5, tie_within=0.0).value == 8
    # Stage 2 / grid: best mean, ties to the lowest std, then the larger G_C.
    s2 = candidate_stats(pd.DataFrame([{"candidate": f"gc{gc}", "effective_gm": 8, "channel_groups": gc, "eval_acc": a}
                                       for gc, accs in {1: [0.82, 0.83], 4: [0.824, 0.826], 16: [0.82, 0.83]}.items()
                                       for a in accs]))
    assert select_best(s2, "gc", tie_within=0.0).value == 4
    assert select_best(s2, "gc", tie_within=0.0).mean == pytest.approx(82.5)
    assert select_gm(_stats({2: [0.9], 4: [0.9]}), 0.5, 0.0).value == 4  # one seed: unknown spread, larger G_M


def test_grid_and_stage_tables():
    rows = grid_rows(BASE, [1, 2, 4], [2, 8], [0, 1])
    assert len(rows) == 12 and len({r["row_id"] for r in rows}) == 12
    assert {(r["channel_groups"], r["ghost_groups"], r["seed"]) for r in rows} == {
        (gc, gm, s) for gc in (1, 2, 4) for gm in (2, 8) for s in (0, 1)}
    assert all(r["norm"] == "seq" and r["mode"] == "layer" and r["dataset"] == "digits" for r in rows)
    placed = stage1_rows(BASE, [4, 8], [0], launcher="torchrun", nprocs=2)  # G_M = n_g x G_layer
    assert [(r["ghost_groups"], r["nprocs"], r["launcher"]) for r in placed] == [(2, 2, "torchrun"), (4, 2, "torchrun")]


def _fake_results(table, results, acc_by_gm):
    """Complete run directories for every row of a stage-1 table (what launch/run.py --out leaves)."""
    seen: dict[int, int] = {}
    for row in read_table(table):
        gm = int(row["ghost_groups"])
        acc = acc_by_gm[gm][seen.get(gm, 0)]
        seen[gm] = seen.get(gm, 0) + 1
        d = results / row["row_id"]
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"norm": "ghost", "ghost_groups": gm}))
        (d / "summary.json").write_text(json.dumps({"status": "complete", "effective_gm": gm, "eval_acc": acc}))


def test_stage2_reads_stage1_results_and_builds_its_table(tmp_path, capsys):
    s1 = tmp_path / "s1.csv"
    assert sweep.main(["sequential", "--stage", "1", "--gm", "2,4,8,16,32", "--seeds", "0,1", "--out", str(s1),
                       "--", "--dataset", "digits", "--model", "simplenet", "--epochs", "3"]) == 0
    _fake_results(s1, tmp_path / "res", STAGE1)
    s2 = tmp_path / "s2.csv"
    assert sweep.main(["sequential", "--stage", "2", "--stage1", str(s1), "--results", str(tmp_path / "res"),
                       "--gc", "1,2,4", "--seeds", "0,1,2", "--tie-within", "0.25", "--out", str(s2)]) == 0
    assert "stage 1 pick: G_M = 4" in capsys.readouterr().out
    rows = read_table(s2)
    assert len(rows) == 9 and {r["ghost_groups"] for r in rows} == {"4"} and {r["norm"] for r in rows} == {"seq"}
    assert {r["epochs"] for r in rows} == {"3"} and {r["channel_groups"] for r in rows} == {"1", "2", "4"}


@pytest.fixture(scope="module")
def stage1_table(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixture")
    assert sweep.main(["sequential", "--stage", "1", "--gm", "2,4", "--seeds", "0", "--out", str(d / "s1.csv"),
                       "--", "--dataset", "digits", "--model", "simplenet"]) == 0
    return d / "s1.csv"


BAD = [
    (["grid", "--gm", "2"], "--gc"),  # required
    (["grid", "--gc", "1,x", "--gm", "2"], "comma-separated list of integers"),
    (["grid", "--gc", "1", "--gm", "3", "--", "--model", "simplenet"], "valid --ghost-groups"),  # 3 does not divide M
    (["grid", "--gc", "1", "--gm", "2", "--launcher", "torchrun", "--nprocs", "4"], "cannot be placed on 4"),
    (["grid", "--gc", "1", "--gm", "2", "--nprocs", "2"], "--launcher torchrun"),
    (["grid", "--gc", "1", "--gm", "2", "--launcher", "mpirun"], "invalid choice"),
    (["grid", "--gc", "1", "--gm", "2", "--seeds", ""], "seeds"),
    (["grid", "--gc", "1", "--gm", "2", "--", "--norm", "ghost"], "sets itself"),
    (["grid", "--gc", "1", "--gm", "2", "--", "--bogus", "3"], "unrecognized arguments"),
    (["grid", "--gc", "1", "--gm", "2", "--", "--out", "x"], "--out cannot be a run flag"),
    (["grid", "--gc", "1", "--gm", "2", "--", "--batch-size", "0"], "--batch-size 0 must be an integer >= 1"),
    (["grid", "--gc", "1", "--gm", "2", "--", "--preset", "nope"], "--preset 'nope' is unknown"),
    (["sequential", "--stage", "1"], "pass --gm"),
    (["sequential", "--stage", "3", "--gm", "2"], "invalid choice"),
    (["sequential", "--stage", "2", "--gc", "1"], "needs --stage1"),
    (["sequential", "--stage", "2", "--stage1", "/nonexistent/s1.csv", "--gc", "1"], "does not exist"),
    (["sequential", "--stage", "2", "--stage1", "{s1}", "--gc", "1"], "no complete result"),
    (["sequential", "--stage", "2", "--stage1", "{s1}", "--gc", "1", "--well-within", "-1"], ">= 0"),
    (["sequential", "--stage", "2", "--stage1", "{s1}", "--gc", "1", "--", "--lr", "1"], "from the stage-1 table"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,expect", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_sweep_bad_input_is_refused(argv, expect, tmp_path, capsys, stage1_table):
    argv = [a.replace("{s1}", str(stage1_table)) for a in argv]
    assert_refused(sweep.main, argv, tmp_path / "w", capsys, expect)
