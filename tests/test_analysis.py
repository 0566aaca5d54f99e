"""The analysis notebooks, executed with papermill against real results produced in this test session.

Sources, shared wherever another test already produces them (tests/conftest.py):
- modes: the session's equivalence table (every mechanism of G_M = 4 through python, accelerate launch, torchrun
  and DeepSpeed, SyncBN over two ranks, the G_M = 1 control), the short Slurm sweep where Slurm is here (G_M = 2
  through four launchers, the multi-node template's run), and one run here: the table's G_M = 4 layer with the
  sequential running-statistics policy (the table's runs the mean one);
- equivalence: two of the checker's float32 runs (1 process, Accelerate; 2 processes, DeepSpeed);
- cost: the profile sweep (unsynced and SyncBN on 1 and 2 processes), plus two accumulation runs at n_fp 1 and 4;
- landscape, tuning: tiny in-process runs (digits, SimpleNet).
Each saved figure must be a real PNG of sensible size, with the rows it shows (CSV beside it) holding what it
should: the modes, G_M values, checker runs, device counts, norms and grid cells asked for.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ghostsys.study import analysis
from ghostsys.study.notebooks import execute_many, notebooks
from ghostsys.study.sweep import make_row
from tests._launch import ROOT
from tests._refusal import assert_refused
from tests._slurm_sweep import EQUIVALENCE_FLAGS

# Its sources are multi-process runs (Slurm sweep, profile sweep, checker). Run first (file order), its setup may
# pay for those shared session fixtures too: the timeout covers them (each runs once per session, whoever asks).
pytestmark = [pytest.mark.dist, pytest.mark.timeout(1800)]

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = {"modes": ["modes_curves", "modes_overlap", "modes_eval_policies"], "equivalence": ["equivalence_heatmap"],
           "cost": ["cost_throughput", "cost_collectives", "cost_memory"], "landscape": ["landscape_bands"],
           "tuning": ["tuning_grid"]}
DIGITS = {"dataset": "digits", "model": "simplenet", "batch_size": 64, "max_steps": 6, "progress": False}
CHECKS = {1: "cnn-k3-accelerate", 2: "cnn-k3-deepspeed"}
NFP_PROFILE = ["--modes", "accumulate", "--nfps", "1,4", "--world-sizes", "1", "--batch-size", "64", "--steps", "2",
               "--warmup", "1", "--profiled-steps", "0", "--model", "cnn", "--launcher", "torchrun", "--no-progress"]


def _extra_modes() -> list[dict]:
    """The equivalence table's G_M = 4 explicit layer with the sequential running-statistics policy."""
    return [make_row({**EQUIVALENCE_FLAGS, "mode": "layer", "ghost_groups": 4, "stats_policy": "sequential"},
                     name="layer-g4-sequential")]


@pytest.fixture(scope="module")
def sources(request, tmp_path_factory, float32_runs, profile_sweep, study_sweep) -> dict[str, list[Path]]:
    """Every notebook's results folder(s): the shared fixtures' plus the small extra runs made here."""
    extra = tmp_path_factory.mktemp("analysis-runs")
    shared = [study_sweep.results]  # through Slurm, or here where Slurm is not (tests/conftest.py)
    try:
        sw = request.getfixturevalue("slurm_sweep")
        shared += [sw.results, sw.multinode_out]
    except pytest.skip.Exception:  # no Slurm on this machine: no G_M = 2 sweep
        pass
    # The two profiled launches run on the second core while this process trains the small runs.
    profile = subprocess.Popen([sys.executable, "launch/profile.py", *NFP_PROFILE, "--out", str(extra / "profile")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stage1, grid = analysis.tuning_rows({**DIGITS, "lr": 0.4, "momentum": 0.0}, gcs=(1, 2), gms=(2, 4), seeds=(0, 1))
        landscape = analysis.landscape_rows({**DIGITS, "lr": 0.4, "momentum": 0.0}, seeds=(0,), ghost_gm=4,
                                            lrs="0.1,0.4")
        for part, rows in (("modes", _extra_modes()), ("landscape", landscape), ("tuning", stage1 + grid)):
            assert not analysis.run_rows(rows, extra / part, log=lambda _: None)
        out, _ = profile.communicate(timeout=600)
    finally:
        if profile.poll() is None:  # a failed run above: do not leave the profiler running
            profile.kill()
    assert profile.returncode == 0, out[-3000:]
    return {"modes": [*shared, extra / "modes"], "equivalence": [float32_runs[n] / c for n, c in CHECKS.items()],
            "cost": [profile_sweep[0], extra / "profile"], "landscape": [extra / "landscape"], "tuning": [extra / "tuning"]}


@pytest.fixture(scope="module")
def executed(sources, tmp_path_factory) -> Path:
    """Every notebook executed (papermill, two kernels at a time) against its sources, and the cost notebook
    against a folder with no results; the output folder (notebooks/, figures/, empty/)."""
    out = tmp_path_factory.mktemp("analysis")
    nbs = notebooks()
    assert set(nbs) == set(FIGURES), "a notebook was added or removed: list its figures in FIGURES"
    jobs = {name: (path, out / "notebooks" / f"{name}.ipynb",
                   {"results": [str(p) for p in sources[name]], "figures": str(out / "figures")})
            for name, path in nbs.items()}
    jobs["empty"] = (nbs["cost"], out / "empty" / "cost.ipynb",
                     {"results": str(out / "nothing"), "figures": str(out / "empty" / "figures")})
    errors = {k: v for k, v in execute_many(jobs).items() if v is not None}
    assert not errors, errors
    return out


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_saves_real_pngs(executed, name):
    import matplotlib.image
    import nbformat

    nb = nbformat.read(executed / "notebooks" / f"{name}.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == len(FIGURES[name]), f"{name}: {len(shown)} figures shown"
    for fig in FIGURES[name]:
        png = executed / "figures" / f"{fig}.png"
        assert png.read_bytes()[:8] == PNG, png
        h, w = matplotlib.image.imread(png).shape[:2]
        assert 250 <= h <= 3000 and 400 <= w <= 3000, (fig, w, h)
        assert len(pd.read_csv(png.with_suffix(".csv"))), f"{fig}: no rows behind the figure"


def _rows(executed: Path, fig: str) -> pd.DataFrame:
    return pd.read_csv(executed / "figures" / f"{fig}.csv")


def test_modes_figures_hold_every_mode_and_gm(executed, sources):
    curves = _rows(executed, "modes_curves")
    with_slurm = len(sources["modes"]) > 2
    assert set(curves["G_M"]) == ({1, 2, 4} if with_slurm else {1, 4})
    assert {"layer", "accumulate", "unsynced", "syncbn"} <= set(curves["mode"])
    spread = _rows(executed, "modes_overlap")
    within = spread[spread["compared"] == "factorizations of one G_M"]
    assert set(within["G_M"]) == ({1, 2, 4} if with_slurm else {1, 4})
    # Equivalent factorizations agree to roundoff (float32 at worst); different G_M values clearly do not.
    assert within["spread"].max() < 1e-4 < spread[spread["compared"] == "across G_M values"]["spread"].max()
    policies = _rows(executed, "modes_eval_policies")
    gm4 = policies[(policies["G_M"] == 4) & policies["experiment"].str.contains("dtype=float64")]
    gm4 = gm4.set_index(gm4["variant"].str.removesuffix(", float64"))
    assert {"layer: 1x1x4, stats mean", "layer: 1x1x4, stats sequential", "accumulate: 1x4x1",
            "unsynced: 2x2x1"} <= set(gm4.index)
    assert gm4["train_loss"].max() - gm4["train_loss"].min() < 1e-9  # float64: they trained identically
    # The sequential policy IS accumulation's running statistics: the same evaluation (float64, 20 steps); the
    # mean policy's differ, and with them the evaluation (measured: 0.937 vs 1.090 on one process).
    acc = gm4.loc["accumulate: 1x4x1", "eval_loss"]
    assert gm4.loc["layer: 1x1x4, stats sequential", "eval_loss"] == pytest.approx(acc, rel=1e-9)
    assert gm4.loc["layer: 1x1x4, stats mean", "eval_loss"] != pytest.approx(acc, rel=1e-3)


def test_equivalence_heatmap_has_both_checks_and_the_control(executed):
    rows = _rows(executed, "equivalence_heatmap")
    assert rows["check_run"].nunique() == 2 and set(rows["world_size"]) == {1, 2}
    control = rows[rows["section"] == "control"]
    assert len(control) >= 2 and (control["ratio"] > 100).any()
    comps = rows[rows["section"] != "control"]
    assert comps["passed"].all() and (comps["ratio"] < 1).all()
    assert set(comps["tol_source"]) <= {"derived", "floor"}  # float32: tolerances derived in the run


def test_cost_figures_cover_device_counts_collectives_and_nfp(executed):
    tput = _rows(executed, "cost_throughput")
    assert set(zip(tput["mode"], tput["world_size"])) == {(m, n) for m in ("unsynced", "syncbn") for n in (1, 2)}
    two = tput[tput["world_size"] == 2]
    assert two["scaling_efficiency"].between(0, 1.5).all()
    coll = _rows(executed, "cost_collectives").set_index("mode")
    assert coll.loc["syncbn", "collective_share_syncbn"] > 0 and coll.loc["unsynced", "collective_share_syncbn"] == 0
    mem = _rows(executed, "cost_memory")
    assert sorted(mem["nfp"]) == [1, 4] and (mem["mem_mib"] > 0).all()


def test_landscape_and_tuning_figures(executed):
    bands = _rows(executed, "landscape_bands")
    assert set(bands["norm_label"]) == {"BatchNorm (G_M=1)", "GhostNorm (G_M=4)", "no normalization"}
    assert (bands["landscape_max"] >= bands["landscape_min"]).all()
    grid = _rows(executed, "tuning_grid")
    seq, ghost = grid[grid["stage"] == "seq"], grid[grid["stage"] == "ghost"]
    assert set(zip(seq["gc"], seq["gm"])) == {(1, 2), (1, 4), (2, 2), (2, 4)} and set(ghost["gm"]) == {2, 4}
    assert (grid["n"] == 2).all()  # two seeds per candidate


def test_a_notebook_with_no_results_says_so(executed):
    text = (executed / "empty" / "cost.ipynb").read_text()
    assert "no profile rows under" in text and text.count(": skipped (") == 4  # the table and its 3 figures
    assert not (executed / "empty" / "figures").exists()


@pytest.mark.parametrize("argv,expect", [
    (["--only", "modes,nope"], "--only"),
    (["--threads", "0"], "--threads"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, argv, expect):
    import importlib.util

    spec = importlib.util.spec_from_file_location("analysis_script", ROOT / "launch" / "analysis.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    assert_refused(script.main, argv, tmp_path / "w", capsys, expect)
