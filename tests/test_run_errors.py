"""Bad input to launch/run.py: one clear message naming the fix, non-zero exit, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests._launch import ROOT, run

FAST = ["--batch-size", "32", "--max-steps", "3", "--no-progress"]


@pytest.mark.parametrize("args,needle", [
    (["--nfp", "3"], "valid --nfp"),                                        # n_fp must divide M/n_g
    (["--mode", "warp"], "--mode 'warp' is unknown"),
    (["--mode", "syncbn", "--norm", "ghost"], "cannot be combined"),        # contradictory combination
    (["--mode", "layer", "--norm", "batch"], "--norm ghost or seq"),
    (["--mode", "accumulate", "--ghost-groups", "4"], "only applies to --norm ghost or seq"),
    (["--mode", "layer", "--ghost-groups", "5"], "valid --ghost-groups"),
    (["--model", "simplenet", "--mode", "layer", "--ghost-groups", "32"], "single value"),  # ghost slice of one value
    (["--nprocs", "2"], "ACCELERATE_USE_CPU=1"),                            # asked for 2, launched 1
    (["--zero-stage", "2"], "need --engine deepspeed"),
    (["--engine", "deepspeed", "--zero-stage", "3"], "ZeRO stages 0, 1, 2"),
    (["--norm", "noisy"], "--noise-std"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "--data-root"),
])
def test_bad_input_fails_cleanly(tmp_path, args, needle):
    out = tmp_path / "run"
    proc = run([*FAST, *args, "--out", str(out)], check=False, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (out / "summary.json").exists() and not (out / "metrics.jsonl").exists()


def test_deepspeed_config_conflict(tmp_path):
    conf = tmp_path / "ds.json"
    conf.write_text(json.dumps({"gradient_accumulation_steps": 3}))
    proc = run([*FAST, "--engine", "deepspeed", "--nfp", "2", "--deepspeed-config", str(conf), "--out", str(tmp_path / "r")],
               check=False, timeout=180)
    assert proc.returncode != 0 and "gradient_accumulation_steps" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    proc = run([*FAST, "--lr", "1e12", "--max-steps", "30", "--out", str(tmp_path / "r")], check=False)
    assert proc.returncode == 1 and "lower --lr" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r" / "summary.json").exists()


def test_syncbn_on_one_process_warns(tmp_path):
    proc = run([*FAST, "--mode", "syncbn", "--out", str(tmp_path / "r")])
    assert "syncbn on one process is plain BatchNorm" in proc.stdout


def test_other_experiment_in_the_same_directory_is_refused(tmp_path):
    run([*FAST, "--out", str(tmp_path / "r")])
    proc = run([*FAST, "--nfp", "2", "--out", str(tmp_path / "r")], check=False)
    assert proc.returncode == 2 and "different configuration" in proc.stderr and "nfp" in proc.stderr


def test_plain_accelerate_cpu_launch_with_two_processes_is_refused(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process: ghostsys must not run silently."""
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--cpu",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(ROOT / "launch/run.py"), *FAST, "--out", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ACCELERATE_USE_CPU=1" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()


@pytest.mark.dist
def test_a_dead_rank_fails_the_whole_job(tmp_path):
    """Rank 1 dies mid-run: the job exits non-zero (torchrun tears it down; the collective timeout backs it up)."""
    proc = run([*FAST, "--max-steps", "50", "--mode", "unsynced", "--nprocs", "2", "--collective-timeout", "20",
                "--out", str(tmp_path / "r")], launcher="torchrun", nprocs=2, script="tests/die_at_step.py",
               check=False, timeout=120)
    assert proc.returncode != 0
    assert "die_at_step" in proc.stderr or "ChildFailedError" in proc.stderr or "exitcode" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "r" / "summary.json").exists()
