"""launch/run.py failing the way users meet it: NaN loss, another experiment in --out, a launch that
started fewer processes than asked, a dead rank. The bad-input table (every flag's invalid values,
in-process) is tests/test_bad_input.py.

One-process runs call launch/run.py's main(argv) here, as tests/test_bad_input.py does: the exit code it
returns is the one `python launch/run.py` exits with (its last line is sys.exit(main())), and what it prints
is what the user reads; only the interpreter's start-up (seconds of imports) is left out. What needs a launcher
(accelerate launch's quirk, a dead rank under torchrun) runs as a real launch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launch.run import main
from tests._launch import ROOT, run

FAST = ["--batch-size", "32", "--max-steps", "3", "--no-progress"]


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    """launch/run.py in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_nan_loss_stops_with_a_clear_message(tmp_path, capsys):
    code, _, err = _main([*FAST, "--lr", "1e12", "--max-steps", "30", "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "lower --lr" in err, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == err.strip().splitlines()[-1:]
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_syncbn_on_one_process_warns(tmp_path, capsys):
    code, out, err = _main([*FAST, "--mode", "syncbn", "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "syncbn on one process is plain BatchNorm" in out, err[-2000:]


def test_other_experiment_in_the_same_directory_is_refused(tmp_path, capsys):
    assert _main([*FAST, "--out", str(tmp_path / "r")], capsys)[0] == 0
    code, _, err = _main([*FAST, "--nfp", "2", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "different configuration" in err and "nfp" in err


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
    assert "die_at_step: rank 1 is killing itself" in proc.stderr, proc.stderr[-3000:]  # it died where meant to
    assert not (tmp_path / "r" / "summary.json").exists()
