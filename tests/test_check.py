"""The equivalence checker end to end: both engines on 2 CPU processes, SyncBN subgroups on 4,
SeqNorm, float32 and bf16 autocast with tolerances derived in the run, and deliberately wrong variants
that it must catch (fault injection) -- in float32 and, where bf16 resolves them, in bf16."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from ghostsys.check.tolerance import SAFETY_FACTOR
from tests._launch import run
from tests._refusal import assert_refused

pytestmark = pytest.mark.dist


def _rows(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "check.csv")


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _assert_clean_pass(proc, out: Path) -> pd.DataFrame:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "## Comparisons" in proc.stdout and "Running statistics, in words" in proc.stdout
    df = _rows(out)
    assert df["passed"].all()
    assert (df["section"] == "control").sum() >= 2  # the negative control is in every report
    summary = _summary(out)
    assert summary["exit_code"] == 0 and summary["control_ok"]
    return df


def test_one_process_every_factorization_float64(tmp_path):
    out = tmp_path / "c1"
    df = _assert_clean_pass(run(["--out", str(out)], script="launch/check.py", check=False), out)
    # n_g = 1, G_M = 8: G_layer 8, n_fp 2 x G_layer 4, n_fp 4 x G_layer 2 (layer), n_fp 8 (accumulate)
    facts = set(df["factorization"])
    for f in ("G_M=8 = n_g 1 x n_fp 1 x G_layer 8", "G_M=8 = n_g 1 x n_fp 2 x G_layer 4",
              "G_M=8 = n_g 1 x n_fp 4 x G_layer 2", "G_M=8 = n_g 1 x n_fp 8 x G_layer 1"):
        assert f in facts, f
    comps = df[df["section"].isin(["forward", "grads", "weights", "buffers"])]
    assert comps["max_rel"].max() < 1e-10  # float64: summation order only
    assert (df["tol"] == 1e-10).all() and (df["tol_source"] == "analytic").all() and df["divergence"].isna().all()
    control = df[df["section"] == "control"]
    assert control["max_rel"].min() > 1e-3  # G_M = 1 vs 8 differs by orders of magnitude more
    assert set(control["quantity"]) == {"logits", "grads", "weights", "buffers"}


@pytest.mark.parametrize("launcher,engine", [("torchrun", "accelerate"), ("deepspeed", "deepspeed")])
def test_two_processes_both_engines(tmp_path, launcher, engine):
    # DeepSpeed cannot train float64: its default is float32, ZeRO 2 here, with tolerances derived in the run.
    out = tmp_path / engine
    extra = ["--zero-stage", "2"] if engine == "deepspeed" else []
    proc = run(["--engine", engine, *extra, "--out", str(out)], launcher=launcher, nprocs=2, script="launch/check.py",
               check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = _rows(out)
    assert {"layer", "unsynced", "syncbn"} <= set(df["mode"])
    assert (df["section"] == "facts").sum() >= 2  # broadcast/drift and all-reduce statements, each measured
    words = proc.stdout.split("Running statistics, in words")[1]
    assert ("DDP" in words) if engine == "accelerate" else ("DeepSpeed never syncs buffers" in words)
    if engine == "deepspeed":
        assert not (df["section"] == "grads").any()  # ZeRO 2 partitions the gradients: only the control has them
        assert (df["tol_source"].isin(["derived", "floor"])).all() and "## Tolerances" in proc.stdout


def test_syncbn_over_subgroups_of_two_on_four_processes(tmp_path):
    out = tmp_path / "sub"
    proc = run(["--modes", "syncbn", "--sync-group-size", "2", "--out", str(out)], launcher="torchrun", nprocs=4,
               script="launch/check.py", check=False)
    df = _assert_clean_pass(proc, out)
    assert "G_M=8 = (n_g 4 / k 2) x n_fp 4 x G_layer 1" in set(df["factorization"])
    assert (df["quantity"] == "buffers rank 3").any()


def test_seqnorm_ghost_part_factorizes(tmp_path):
    out = tmp_path / "seq"
    df = _assert_clean_pass(run(["--norm", "seq", "--target-gm", "4", "--out", str(out)], script="launch/check.py",
                                check=False), out)
    assert {"layer", "accumulate"} <= set(df["mode"])


# --- float32: correct code passes, injected faults are caught ---------------------------------------
# Several checks per launch (tests/check_worker.py): start-up dominates small checks. Small M and G_M.
# Every model runs at k = 3 and k = 10 on one and on two processes, and each engine sees every model on
# each world size (a covering design: the full cross product would double the time for no new path).
SMALL = dict(batch_size=16, target_gm=4, dtype="float32")
# resnet20 with seed 1: with seed 0 one first-step activation sits within 2 units of roundoff of its ReLU,
# float32 can flip it, and the hard control then stands only ~114x above its tolerance (it passes, but a
# test should not ride that edge; the closing note reports that case).
R20 = dict(model="resnet20", seed=1)
ONE = {
    "cnn-k3-accelerate": dict(model="cnn", steps=3),
    "simplenet-k10-accelerate": dict(model="simplenet", steps=10),
    "resnet20-k3-accelerate": dict(R20, steps=3),
    "cnn-k10-deepspeed": dict(model="cnn", steps=10, engine="deepspeed"),
    "simplenet-k3-deepspeed": dict(model="simplenet", steps=3, engine="deepspeed"),
    "resnet20-k10-deepspeed": dict(R20, steps=10, engine="deepspeed", modes="accumulate"),
    "inject-no-nfp-scaling": dict(model="cnn", steps=2, modes="accumulate", inject="no-nfp-scaling"),
}
TWO = {
    "cnn-k10-accelerate": dict(model="cnn", steps=10),
    "simplenet-k3-accelerate": dict(model="simplenet", steps=3),
    "resnet20-k10-accelerate": dict(R20, steps=10, modes="unsynced"),
    "cnn-k3-deepspeed": dict(model="cnn", steps=3, engine="deepspeed", zero_stage=1),
    "simplenet-k10-deepspeed": dict(model="simplenet", steps=10, engine="deepspeed", zero_stage=2),
    "resnet20-k3-deepspeed": dict(R20, steps=3, engine="deepspeed"),
    "inject-interleaved": dict(model="cnn", steps=2, modes="unsynced", inject="interleaved"),
    "inject-wrong-rank-buffers": dict(model="cnn", steps=2, modes="unsynced", engine="deepspeed", zero_stage=2,
                                      inject="wrong-rank-buffers"),
}
INJECTED = {"inject-no-nfp-scaling": (1, "grads"), "inject-interleaved": (2, "logits"),
            "inject-wrong-rank-buffers": (2, "buffers rank 0")}

# bf16 autocast (Accelerate's, through --mixed-precision bf16), in the same two launches. resnet20 (seed 1, as
# above) on one process, simplenet over every 2-process mode; the two faults bf16 still catches at this size.
# (wrong-rank-buffers is left out: at bf16 its buffers sit near their tolerance -- 1.25x at M = 16, 0.5x and
# so "cannot tell apart", exit 4, at M = 32 -- and a test must not ride that edge either way.)
BF16 = dict(dtype="bf16-autocast")
ONE |= {"bf16-resnet20-k3": dict(R20, **BF16, steps=3),
        "bf16-inject-no-nfp-scaling": dict(BF16, model="cnn", steps=2, modes="accumulate", inject="no-nfp-scaling")}
TWO |= {"bf16-simplenet-k3": dict(BF16, model="simplenet", steps=3),
        "bf16-inject-interleaved": dict(BF16, model="cnn", steps=2, modes="unsynced", inject="interleaved")}
BF16_CORRECT = [(1, "bf16-resnet20-k3"), (2, "bf16-simplenet-k3")]
BF16_INJECTED = {"bf16-inject-no-nfp-scaling": (1, "grads"), "bf16-inject-interleaved": (2, "logits")}


# float32_runs (tests/conftest.py) runs every case above once per session: one plain-python launch (1 process)
# and one torchrun launch (2 processes); the analysis notebooks' test draws its heatmap from them too.


CORRECT = [(nprocs, n) for nprocs, cases in ((1, ONE), (2, TWO)) for n in cases
           if n not in INJECTED and not n.startswith("bf16-")]


@pytest.mark.parametrize("nprocs,name", CORRECT, ids=[f"{n}p-{name}" for n, name in CORRECT])
def test_float32_passes_on_correct_code(float32_runs, nprocs, name):
    out = float32_runs[nprocs] / name
    s, df = _summary(out), _rows(out)
    assert s["exit_code"] == 0 and s["control_ok"] and s["all_passed"], df[~df["passed"]].to_string()
    counted = df[~df["verdict"].isin(["weak", "unresolved"])]
    assert counted["passed"].all()
    # The hard negative control (first-step logits and grads, G_M = 1 vs the target) differs by > 100x
    # the derived tolerance; weights/buffers after k steps may only be stated (weak / unresolved).
    hard = df[(df["section"] == "control") & df["quantity"].isin(["logits", "grads"])]
    assert len(hard) == 2 and (hard["verdict"] == "differs").all() and (hard["ratio"] > 100).all()
    assert s["max_ratio_ok"] <= 1 and s["min_ratio_control"] > 100


def test_derived_tolerances_are_recorded_with_their_divergence_and_factor(float32_runs):
    out = float32_runs[1] / "cnn-k3-accelerate"
    records = [json.loads(line) for line in (out / "check.jsonl").read_text().splitlines()]
    for r in records:
        assert r["tol_source"] in ("derived", "floor") and r["divergence"] is not None and r["tol"] > 0
        # A statement comparing two float32 runs with each other allows each its own tolerance: 2x.
        factor = 2 * SAFETY_FACTOR if r["section"] == "facts" else SAFETY_FACTOR
        assert r["factor"] == factor
        if r["tol_source"] == "derived":
            assert math.isclose(r["tol"], factor * r["divergence"], rel_tol=1e-12)
    tols = _summary(out)["tolerances"]
    assert {t["quantity"] for t in tols} == {"logits", "loss", "grads", "weights", "buffers"}
    for t in tols:  # every draw of the reference and its divergence, and the largest is the one used
        assert len(t["draws"]) == 3 and t["divergence"] == max(v for _, v in t["draws"])


@pytest.mark.parametrize("name", list(INJECTED))
def test_float32_catches_every_injected_fault(float32_runs, name):
    nprocs, failing = INJECTED[name]
    out = float32_runs[nprocs] / name
    s, df = _summary(out), _rows(out)
    assert s["exit_code"] == 1, s  # caught: a comparison failed (4 would say: not caught, cannot tell apart)
    bad = df[df["verdict"] == "FAIL"]
    assert failing in set(bad["quantity"]), bad[["quantity", "max_rel", "tol"]]
    assert s["max_ratio_failed"] == "inf" or s["max_ratio_failed"] > 10  # caught clearly, not by a hair
    hard = df[(df["section"] == "control") & df["quantity"].isin(["logits", "grads"])]
    assert (hard["verdict"] == "differs").all()  # the control itself still works


@pytest.mark.parametrize("nprocs,name", BF16_CORRECT, ids=[f"{n}p-{name}" for n, name in BF16_CORRECT])
def test_bf16_autocast_passes_on_correct_code_and_states_what_it_cannot_resolve(float32_runs, nprocs, name):
    out = float32_runs[nprocs] / name
    s, df = _summary(out), _rows(out)
    assert s["exit_code"] == 0 and s["all_passed"] and s["control_ok"], df[~df["passed"]].to_string()
    assert s["precision"] == "bf16-autocast" and not s["hard_controls"]
    assert {t["precision"] for t in s["tolerances"]} == {"bf16-autocast"}
    assert set(df["tol_source"]) <= {"derived", "floor"} and (df["factor"].isin([SAFETY_FACTOR, 2 * SAFETY_FACTOR])).all()
    # The engine really trained under bf16 autocast: first-step logits land further from float64 than float32
    # can (2^-16 is 256 float32 roundoffs; bf16's unit roundoff is 2^-8).
    assert (df[df["quantity"] == "logits"]["max_rel"] > 2.0 ** -16).all()
    # No control can reach 100x at bf16: every control is a stated resolution, and the first-step logits one
    # still tells G_M = 1 from the target (err/tol > 1), which is what lets the check pass.
    ctrl = df[df["section"] == "control"].set_index("quantity")
    assert set(ctrl["verdict"]) <= {"weak", "unresolved", "differs"}
    assert ctrl.loc["logits", "verdict"] in ("weak", "differs") and ctrl.loc["logits", "ratio"] > 1


@pytest.mark.parametrize("name", list(BF16_INJECTED))
def test_bf16_autocast_catches_the_faults_it_can_resolve(float32_runs, name):
    nprocs, failing = BF16_INJECTED[name]
    out = float32_runs[nprocs] / name
    s, df = _summary(out), _rows(out)
    assert s["exit_code"] == 1, s
    assert failing in set(df[df["verdict"] == "FAIL"]["quantity"])


@pytest.mark.parametrize("argv, expect", [
    (["--dtype", "float16"], "--dtype"),
    (["--dtype", "bf16-autocast", "--engine", "deepspeed"], "--engine accelerate for bf16"),
    (["--inject", "wrong-rank-buffers"], "does not exist on 1 process"),
    (["--dtype", "tf32"], "CUDA"),
    (["--inject", "everything"], "--inject"),
    (["--target-gm", "1"], "--target-gm"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, argv, expect):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_script", Path(__file__).parents[1] / "launch" / "check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    assert_refused(script.main, argv, tmp_path / "w", capsys, expect)
