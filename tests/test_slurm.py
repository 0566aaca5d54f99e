"""Against a REAL Slurm (issue 13): an array sweep, a preempted task that requeues and resumes, the multi-node
template under srun, and collect. One session-scoped sweep feeds them all (tests/_slurm_sweep.py), and with it
the equivalence table whose runs tests/test_run_e2e.py compares."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from ghostsys.run.rundir import read_jsonl
from ghostsys.study.sweep import make_row, read_table, write_table
from tests._slurm_sweep import drill_row, sweep_cli

# The first test also pays for the session's sweep (tests/_slurm_sweep.py, bounded by its WAIT_S).
pytestmark = [pytest.mark.dist, pytest.mark.timeout(2400)]

SUMMARY_NUMBERS = ("final_train_loss", "final_train_acc", "eval_loss", "eval_acc", "steps", "effective_gm")
METRIC_KEYS = ("step", "train_loss", "train_acc", "lr", "eval_loss", "eval_acc")


def _numbers(run: Path) -> tuple[list[dict], dict]:
    metrics = [{k: m[k] for k in METRIC_KEYS if k in m} for m in read_jsonl(run / "metrics.jsonl")]
    summary = json.loads((run / "summary.json").read_text())
    return metrics, {k: summary[k] for k in SUMMARY_NUMBERS}


def test_every_row_of_the_array_sweep_completes_and_is_collected(slurm_sweep):
    sw = slurm_sweep
    assert sw.collect_rc == 0, sw.collect_out + sw.logs()
    rows = read_table(sw.table)
    df = pd.read_csv(sw.csv)
    assert list(df["row_id"]) == [r["row_id"] for r in rows]
    assert (df["state"] == "complete").all(), df[["row_id", "state"]]
    assert set(df["table.launcher"]) == {"python", "accelerate", "torchrun", "deepspeed"}
    assert (df["effective_gm"] == 2).all() and sorted(df["world_size"]) == [1, 1, 2, 2]
    assert (df["steps"] == df["table.max_steps"]).all()
    arrays = sw.jobs["sweep"].split(",")
    assert len(arrays) == 2  # one array job per process count: 1-process rows, 2-process rows
    for i, r in enumerate(rows):  # keyed by the row's stable id, never by the Slurm job id
        run = sw.results / r["row_id"]
        assert (run / "summary.json").exists() and (run / "config.json").exists()
        attempts = read_jsonl(run / "attempts.jsonl")
        assert attempts[-1]["event"] == "end" and attempts[-1]["exit_code"] == 0
        assert attempts[0]["slurm_array_job_id"] == arrays[int(r["nprocs"]) - 1]
        assert attempts[0]["slurm_array_task_id"] == str(i)  # task i ran row i
        # one log per task, %A_%a, in the results folder
        log = sw.results / "logs" / f"{attempts[0]['slurm_array_job_id']}_{i}.out"
        assert log.exists() and attempts[0]["log"] == str(log)
        if r["row_id"] != drill_row()["row_id"]:  # only the signalled task was requeued
            assert [a["event"] for a in attempts] == ["start", "end"] and "slurm_restart_count" not in attempts[0]
        assert r["row_id"] in sw.collect_out  # the printed table names every row


def test_the_equivalence_table_submitted_beside_it_completes_every_row_as_its_array_task(slurm_sweep):
    study = slurm_sweep.study
    assert study.via == "slurm" and study.collect_rc == 0, study.collect_out + slurm_sweep.logs()
    rows = read_table(study.table)
    df = pd.read_csv(study.csv)
    assert list(df["row_id"]) == [r["row_id"] for r in rows] and (df["state"] == "complete").all()
    assert (df["world_size"] == df["table.nprocs"]).all() and (df["steps"] == df["table.max_steps"]).all()
    arrays = slurm_sweep.jobs["equivalence"].split(",")
    assert len(arrays) == 2 and not set(arrays) & set(slurm_sweep.jobs["sweep"].split(","))
    for i, r in enumerate(rows):
        attempts = read_jsonl(study.results / r["row_id"] / "attempts.jsonl")
        assert [a["event"] for a in attempts] == ["start", "end"] and attempts[-1]["exit_code"] == 0
        assert attempts[0]["slurm_array_job_id"] == arrays[int(r["nprocs"]) - 1]
        assert attempts[0]["slurm_array_task_id"] == str(i)


def test_a_signalled_task_checkpoints_requeues_itself_and_resumes_to_the_uninterrupted_result(slurm_sweep):
    sw = slurm_sweep
    assert sw.signalled, "the drill finished before it could be signalled"
    run = sw.results / drill_row()["row_id"]
    attempts = read_jsonl(run / "attempts.jsonl")
    assert [a["event"] for a in attempts] == ["start", "end", "start", "end"], attempts
    first, second = attempts[1], attempts[2]
    # 75, the stop's own exit status, although torchrun reports any failed rank as 1
    assert first["exit_code"] == 75 and attempts[-1]["exit_code"] == 0
    # the same array task ran again (requeued, not resubmitted), counted by SLURM_RESTART_COUNT
    assert attempts[0]["slurm_array_job_id"] == second["slurm_array_job_id"]
    assert attempts[0]["slurm_array_task_id"] == second["slurm_array_task_id"]
    assert "slurm_restart_count" not in attempts[0] and second["slurm_restart_count"] == "1"
    log = Path(attempts[0]["log"]).read_text()
    assert "asking the run to checkpoint" in log and "requeueing" in log and log.count("ghostsys: task ") >= 2, log
    assert "stopped on SIGUSR1 at step" in log, log
    summary = json.loads((run / "summary.json").read_text())
    stop_step = summary["resumed_from"]
    assert 0 < stop_step < summary["steps"]  # it stopped mid-run and resumed from its own checkpoint
    assert f"resuming from the checkpoint at step {stop_step}" in log
    # the uninterrupted reference: the same flags through the multi-node template (srun + torchrun c10d)
    assert _numbers(run) == _numbers(sw.multinode_out)  # every step and the summary, exactly
    rank_files = sorted(p.name for p in (run / "checkpoints" / f"step_{stop_step:08d}").iterdir())
    assert rank_files == ["rank0.pt", "rank1.pt"]  # both ranks stopped at the same step


def test_the_multinode_template_runs_under_srun_with_a_c10d_rendezvous(slurm_sweep):
    sw = slurm_sweep
    log = sw.multinode_log.read_text()
    assert "rendezvous localhost:" in log, log
    assert (sw.multinode_out / "summary.json").exists(), log + sw.logs()
    summary = json.loads((sw.multinode_out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["resumed_from"] == 0


def test_results_are_readable_as_the_umask_says(slurm_sweep):
    """The tasks run with the submitter's umask (Slurm passes it on): every file is 0666 & ~umask."""
    mask = os.umask(0)
    os.umask(mask)
    run = slurm_sweep.results / drill_row()["row_id"]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.json", "env.json", "summary.json", "metrics.jsonl", "rank1.pt"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_submit_skips_complete_rows_and_refuses_a_second_submission_while_the_first_is_queued(
        slurm_sweep, slurm_cluster, tmp_path):
    sw = slurm_sweep
    rc, out, err = sweep_cli("submit", str(sw.table), "--results", str(sw.results))
    assert rc == 0 and out == "" and "nothing to submit" in err
    table = write_table([make_row({"mode": "layer", "ghost_groups": 2, "max_steps": 1}, name="held")], tmp_path / "t.csv")
    rc, out, err = sweep_cli("submit", str(table), "--results", str(tmp_path / "res"), "--sbatch=--hold")
    assert rc == 0, err
    try:
        assert out.strip() in slurm_cluster.queued()  # held: pending until released
        rc, out2, err2 = sweep_cli("submit", str(table), "--results", str(tmp_path / "res"))
        assert rc == 2 and f"still queued or running ({out.strip()}" in err2 and out2 == ""
    finally:
        slurm_cluster.run("scancel", out.strip())
