"""Results: run directories, append-only metrics, atomic summaries, environment, load() → DataFrame."""

from __future__ import annotations

import json
import os
import sys

import pytest

from ghostsys.run import rundir as results
from ghostsys.run.rundir import RunDir, environment
from ghostsys.study.results import load, load_metrics


def test_summary_is_written_atomically(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "r")
    run.write_summary({"eval_acc": 0.5})
    replaced = []
    real_replace = os.replace

    def failing_replace(src, dst):
        replaced.append((src, dst))
        raise OSError("disk vanished")

    monkeypatch.setattr(results.os, "replace", failing_replace)
    with pytest.raises(OSError):
        run.write_summary({"eval_acc": 0.9})
    src, dst = replaced[0]
    assert os.path.dirname(src) == os.path.dirname(dst) == str(run.path)  # same dir: rename is atomic
    assert json.loads(run.summary_path.read_text()) == {"eval_acc": 0.5}  # old file intact
    assert sorted(p.name for p in run.path.iterdir()) == ["summary.json"]  # no temp file left behind
    monkeypatch.setattr(results.os, "replace", real_replace)
    run.write_summary({"eval_acc": 0.9, "n": 3})
    assert run.read_summary() == {"eval_acc": 0.9, "n": 3} and run.complete


def test_metrics_are_flushed_per_line_and_fsynced_sparingly(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "r")
    syncs = []
    monkeypatch.setattr(results.os, "fsync", lambda fd: syncs.append(fd))
    monkeypatch.setattr(results, "FSYNC_INTERVAL_S", 3600.0)
    for step in range(1, 6):
        run.append_metrics({"step": step, "loss": 1.0 / step})
        # Another reader sees the line at once: it was flushed, not buffered.
        assert json.loads(run.metrics_path.read_text().splitlines()[-1])["step"] == step
    assert len(syncs) == 1  # only the first line paid for an fsync within the interval
    monkeypatch.setattr(results, "FSYNC_INTERVAL_S", 0.0)
    run.append_metrics({"step": 6, "loss": float("nan")})
    assert len(syncs) == 2
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="step"):
        run.append_metrics({"loss": 1.0})


def test_truncate_after_resume_leaves_no_duplicates(tmp_path):
    run = RunDir(tmp_path / "r")
    for step in range(1, 11):
        run.append_metrics({"step": step, "loss": float(step)})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 11, "lo')  # a line torn by a kill mid-write
    assert len(run.read_metrics()) == 10
    assert run.truncate_metrics_after(6) == 6
    for step in range(7, 11):  # the resumed run logs the same steps again
        run.append_metrics({"step": step, "loss": float(step)})
    assert [r["step"] for r in run.read_metrics()] == list(range(1, 11))
    assert all(line.endswith("}") for line in run.metrics_path.read_text().splitlines())


def test_checkpoint_dir_and_config(tmp_path):
    run = RunDir(tmp_path / "a" / "b")
    assert run.checkpoint_dir == tmp_path / "a" / "b" / "checkpoints" and run.checkpoint_dir.is_dir()
    run.write_config({"lr": 0.1, "nested": {"x": 1}})
    run.write_env({"torch": "2"})
    assert json.loads(run.config_path.read_text())["nested"] == {"x": 1}
    assert json.loads(run.env_path.read_text()) == {"torch": "2"}


def _make_runs(base):
    for i, (gm, acc) in enumerate([(1, 0.7), (4, 0.8), (8, 0.75)]):
        run = RunDir(base / "sweep" / f"run{i}")
        run.write_config({"lr": 0.1, "effective_gm": gm, "optim": {"momentum": 0.9}})
        run.append_metrics({"step": 1, "train_loss": 2.0})
        run.append_metrics({"step": 2, "train_loss": 1.5})
        # The summary repeats effective_gm and holds the lr the schedule ended at: config's goes to cfg.lr.
        run.write_summary({"status": "complete", "eval_acc": acc, "effective_gm": gm, "lr": 0.001})
        (run.checkpoint_dir / "step_2").mkdir()
        (run.checkpoint_dir / "step_2" / "config.json").write_text("{}")  # must not look like a run
    unfinished = RunDir(base / "sweep" / "killed")
    unfinished.write_config({"lr": 0.2, "effective_gm": 2})
    unfinished.append_metrics({"step": 1, "train_loss": 2.1})


def test_load_runs_into_one_dataframe(tmp_path):
    _make_runs(tmp_path)
    df = load(tmp_path)  # a parent directory, searched recursively
    assert len(df) == 4 and set(df["status"]) == {"complete", "incomplete"}
    row = df.set_index(df["run_dir"].map(lambda p: os.path.basename(p))).loc["run1"]
    assert row["eval_acc"] == 0.8 and row["effective_gm"] == 4 and row["lr"] == 0.001
    assert row["cfg.lr"] == 0.1 and row["cfg.effective_gm"] == 4 and row["optim.momentum"] == 0.9
    killed = df[df["status"] == "incomplete"].iloc[0]
    assert killed["run_dir"].endswith("killed") and killed["lr"] == 0.2
    # Globs and explicit lists name the same runs.
    assert len(load(str(tmp_path / "sweep" / "run*"))) == 3
    assert len(load([tmp_path / "sweep" / "run0", tmp_path / "sweep" / "killed"])) == 2
    assert load(tmp_path / "empty_glob_*").empty


def test_load_metrics(tmp_path):
    _make_runs(tmp_path)
    m = load_metrics(tmp_path / "sweep")
    assert len(m) == 3 * 2 + 1 and {"run_dir", "step", "train_loss"} <= set(m.columns)
    assert m.groupby("run_dir")["step"].max().to_dict()[str(tmp_path / "sweep" / "killed")] == 1


def test_environment_keys_and_no_eager_deepspeed():
    had_deepspeed = "deepspeed" in sys.modules
    env = environment()
    for key in ("python", "torch", "platform", "cpu", "cpu_count", "hostname", "time", "device_name",
                "cuda_available", "git_rev", "git_dirty"):
        assert key in env, key
    assert env["accelerate"] and env["deepspeed"] and env["torchvision"]  # installed in this venv
    json.dumps(env)  # JSON-able as is
    if not had_deepspeed:
        assert "deepspeed" not in sys.modules  # versions come from metadata, not a 5 s import
