"""End-to-end: launch/run.py through the real launchers, on 1 and 2 CPU processes.

The central property (DESIGN §2): with the same seed and G_M, the explicit layer, gradient
accumulation, unsynced data parallel (both engines) and SyncBN over a rank subgroup see the same
samples in the same ghost groups at every step and so reach the same losses.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._launch import ROOT, launcher_cmd, metrics, run, summary

pytestmark = pytest.mark.dist
# The first test to ask for `curves` waits for the session's Slurm sweep (tests/_slurm_sweep.py, bounded by WAIT_S).
SHARED_SWEEP = pytest.mark.timeout(2400)

# float64, 20 steps, M=64 (tests/_slurm_sweep.py: EQUIVALENCE_FLAGS; checked below): the ghost groups are
# identical by construction, so runs differ only in the order of floating-point sums (per-group reductions,
# DDP's gradient all-reduce, 1/n_fp scaling before vs after summing). In float64 that is ~1e-16 relative per
# operation; 20 SGD steps with momentum amplify it by at most a few orders of magnitude (observed ~1e-14).
# 1e-9 leaves headroom while staying ~7 orders of magnitude below the negative control's difference (~1e-2).
LOSS_RTOL = 1e-9
# float32 (DeepSpeed): unit roundoff 6e-8; per-step reductions differ in order (DeepSpeed's bucketed
# all-reduce vs one process), and 20 momentum-SGD steps amplify it; measured F32_MEASURED below.
F32_LOSS_RTOL = 1e-4
STEPS = 20


def _curve(run_dir: Path) -> torch.Tensor:
    return torch.tensor([m["train_loss"] for m in metrics(run_dir)], dtype=torch.float64)


@pytest.fixture(scope="module")
def curves(study_sweep) -> dict[str, tuple[torch.Tensor, dict]]:
    """Every mechanism of G_M = 4 trained once (and BatchNorm G_M = 1 as the control): the rows of the session's
    equivalence table (tests/conftest.py: through the real Slurm where it is here, else launch/sweep.py run)."""
    assert study_sweep.collect_rc == 0, study_sweep.collect_out  # collect names any failed or missing row
    out = {}
    for name, row in study_sweep.rows.items():
        d = study_sweep.run_dir(name)
        s = summary(d)
        # the row ran as written: its launcher started nprocs processes, in its dtype, for every step
        assert s["world_size"] == int(row["nprocs"]) and s["steps"] == STEPS, (name, s)
        assert json.loads((d / "config.json").read_text())["dtype"] == row["dtype"], name
        out[name] = (_curve(d), s)
    out["_base"] = study_sweep.results
    return out


@SHARED_SWEEP
def test_every_mechanism_of_gm4_is_the_same_experiment(curves):
    ref_name = "layer G4 (python, 1 proc)"
    ref, ref_summary = curves[ref_name]
    assert len(ref) == STEPS and ref_summary["effective_gm"] == 4
    for name, val in curves.items():
        if name.startswith(("control", "_", "f32", "syncbn")):
            continue
        curve, summ = val
        assert summ["effective_gm"] == 4, (name, summ["factorization"])
        torch.testing.assert_close(curve, ref, rtol=LOSS_RTOL, atol=0, msg=lambda m: f"{name} vs {ref_name}: {m}")


@SHARED_SWEEP
def test_deepspeed_float32_matches_the_layer_in_float32(curves):
    ds, summ = curves["f32 unsynced 2 x nfp2 deepspeed (deepspeed, 2 procs)"]
    layer, _ = curves["f32 layer G4 (python, 1 proc)"]
    assert summ["effective_gm"] == 4 and summ["engine"] == "deepspeed"
    torch.testing.assert_close(ds, layer, rtol=F32_LOSS_RTOL, atol=0)
    control, _ = curves["control: BatchNorm G_M=1"]
    assert ((control - layer).abs().max() / layer.abs().max()).item() > 10 * F32_LOSS_RTOL


@SHARED_SWEEP
def test_syncbn_over_two_ranks_is_batchnorm_on_one(curves):
    sync, summ = curves["syncbn k2 (torchrun, 2 procs)"]
    bn, _ = curves["control: BatchNorm G_M=1"]
    assert summ["effective_gm"] == 1 and summ["world_size"] == 2
    torch.testing.assert_close(sync, bn, rtol=LOSS_RTOL, atol=0)


@SHARED_SWEEP
def test_negative_control_batchnorm_differs(curves):
    ref, _ = curves["layer G4 (python, 1 proc)"]
    control, summ = curves["control: BatchNorm G_M=1"]
    assert summ["effective_gm"] == 1
    # From step 1 on the weights differ, so the curves must part by far more than the tolerance.
    rel = ((control - ref).abs().max() / ref.abs().max()).item()
    assert rel > 1e4 * LOSS_RTOL, rel


@SHARED_SWEEP
def test_summary_records_factorization_and_loads_into_one_dataframe(curves, tmp_path):
    from ghostsys.study.results import load

    _, summ = curves["f32 unsynced 2 x nfp2 deepspeed (deepspeed, 2 procs)"]
    assert summ["world_size"] == 2 and summ["nfp"] == 2 and summ["engine"] == "deepspeed"
    assert summ["factorization"] == "G_M=4 = n_g 2 x n_fp 2 x G_layer 1"
    for key in ("final_train_loss", "eval_loss", "eval_acc", "steps", "samples_per_s", "eval_buffers"):
        assert key in summ, key
    df = load([curves["_base"]])  # the parent of all seven run directories
    assert len(df) == 7 and set(df["effective_gm"]) == {1, 4}
    assert (df["status"] == "complete").all()


def test_default_job_learns_above_chance(tmp_path):
    """The embedded default: synthetic data a small CNN learns well above chance (10%) in one epoch."""
    d = tmp_path / "default"
    run(["--mode", "accumulate", "--nfp", "8", "--no-progress", "--out", str(d)])
    s = summary(d)
    assert s["effective_gm"] == 8 and s["steps"] == 16
    assert s["eval_acc"] > 0.5, s["eval_acc"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["factorization"] == "G_M=8 = n_g 1 x n_fp 8 x G_layer 1"
    env = json.loads((d / "env.json").read_text())
    assert "torch" in json.dumps(env)
    again = run(["--mode", "accumulate", "--nfp", "8", "--no-progress", "--out", str(d)])  # the same command again
    assert "already complete" in again.stdout and summary(d) == s


KILL9_STEPS = 30


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, as a node failure or SLURM's cgroup kill does (torchrun's
    workers run in sessions of their own, so killing its process group would leave them running)."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _kill_when(cmd: list[str], env: dict, metrics_file: Path, lines: int, timeout: float = 120) -> int:
    """Start cmd, SIGKILL it and its descendants once metrics_file has `lines` lines; return how many it had."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= lines:
            _kill_tree(proc.pid)
            proc.wait()
            return len(metrics_file.read_text().splitlines())
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    _kill_tree(proc.pid)
    raise AssertionError("run never reached the kill point")


@pytest.mark.parametrize("launcher,nprocs", [("python", 1), ("torchrun", 2)])
def test_resume_after_kill9_ends_with_the_same_results(tmp_path, launcher, nprocs):
    """kill -9 mid-run, same command again: resumes from the last checkpoint, same final metrics.

    One CPU process: bit-identical (same ops in the same order after restoring weights, optimizer,
    scheduler and RNG). Two processes: also bit-identical here (gloo all-reduce of two ranks is
    deterministic), asserted at the same strictness.
    """
    # ResNet-56 makes a step slow enough (~0.1-0.3 s on CPU) that the kill always lands mid-run: after the
    # checkpoints at steps 5 and 10, before the first evaluation, so the resume replays the steps since step 10.
    args = ["--model", "resnet56", "--batch-size", "32", "--max-steps", str(KILL9_STEPS), "--checkpoint-every", "5",
            "--no-progress", "--norm", "noisy", "--noise-std", "0.01", "--eval-every", "15"]
    args += ["--nprocs", "2", "--mode", "unsynced"] if nprocs > 1 else []
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The uninterrupted reference trains meanwhile (its own processes: nothing is shared with the killed run).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reference = pool.submit(run, [*args, "--out", str(straight)], launcher=launcher, nprocs=nprocs)
        cmd, extra = launcher_cmd(launcher, nprocs, str(ROOT / "launch/run.py"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
        had = _kill_when(cmd + args + ["--out", str(resumed)], env, resumed / "metrics.jsonl", lines=13)
        assert not (resumed / "summary.json").exists() and had < KILL9_STEPS
        proc = run([*args, "--out", str(resumed)], launcher=launcher, nprocs=nprocs)
        reference.result()
    assert "resuming from the checkpoint at step" in proc.stdout
    keys = ("step", "train_loss", "train_acc", "lr", "eval_loss", "eval_acc")
    a = [{k: m[k] for k in keys if k in m} for m in metrics(straight)]
    b = [{k: m[k] for k in keys if k in m} for m in metrics(resumed)]
    assert a == b  # every step's metrics, exactly; no duplicated or missing lines
    sa, sb = summary(straight), summary(resumed)
    assert sb["resumed_from"] > 0
    for k in ("final_train_loss", "eval_loss", "eval_acc"):
        assert sa[k] == sb[k], k
