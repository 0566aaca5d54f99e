"""Stop requests (SIGUSR1): checkpoint at the next step boundary, the same step on every rank, resume to the
same results; results readable as the umask says (issue 13, parts 4 and 6)."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from ghostsys.run.config import RunConfig
from ghostsys.run.preempt import EXIT_PREEMPTED, Preempted, stop_on_signals, stopped_in
from ghostsys.run.rundir import RunDir, umask, write_json_atomic
from ghostsys.run.train import Callback, train
from tests._mp import run_ranks

SUMMARY_NUMBERS = ("final_train_loss", "final_train_acc", "eval_loss", "eval_acc", "steps", "effective_gm")
METRIC_KEYS = ("step", "train_loss", "train_acc", "lr", "eval_loss", "eval_acc")


class _SignalAt(Callback):
    """Sends SIGUSR1 to this very process at the end of `step` (as the batch script's forwarding would)."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, s, step, record):
        if step == self.step and self.rank in (None, s.info.rank):
            os.kill(os.getpid(), signal.SIGUSR1)


def _cfg(out: Path, **kw) -> RunConfig:
    return RunConfig(batch_size=32, max_steps=6, progress=False, out=str(out), norm="noisy", noise_std=0.01,
                     **kw)


def _metrics(d: Path) -> list[dict]:
    return [{k: m[k] for k in METRIC_KEYS if k in m} for m in RunDir(d).read_metrics()]


def _same_results(a: Path, b: Path) -> None:
    assert _metrics(a) == _metrics(b)  # every step exactly, no missing or repeated line
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: sa[k] for k in SUMMARY_NUMBERS} == {k: sb[k] for k in SUMMARY_NUMBERS}


def test_a_signal_stops_at_the_next_boundary_with_a_checkpoint_and_the_rerun_ends_the_same(tmp_path):
    """Noisy BatchNorm draws from the RNG every step, so a resume that lost the RNG state would differ."""
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as stopped:
        train(_cfg(tmp_path / "stopped"), callbacks=[_SignalAt(step=1)])
    assert stopped.value.step == 2 and stopped.value.signame == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before  # the handler is the run's only while it runs
    run = tmp_path / "stopped"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (run / "summary.json").exists() and len(_metrics(run)) == 2
    resumed = train(_cfg(run))
    assert resumed["resumed_from"] == 2
    train(_cfg(tmp_path / "straight"))
    _same_results(tmp_path / "straight", run)


def _rank_worker(rank: int, world: int, out: str, signal_rank: int) -> int | None:
    try:
        train(_cfg(Path(out), mode="unsynced", nprocs=2), callbacks=[_SignalAt(step=1, rank=signal_rank)])
    except Preempted as stopped:
        return stopped.step
    return None


@pytest.mark.dist
def test_ranks_stop_at_the_same_step_when_only_one_rank_got_the_signal(tmp_path):
    """Rank 1 alone gets SIGUSR1 after step 1; the boundary's all-reduce stops both before step 2, with one
    checkpoint of both ranks. (That a 2-rank run resumes to the uninterrupted numbers: tests/test_slurm.py.)"""
    run = tmp_path / "stopped"
    assert run_ranks(_rank_worker, 2, str(run), 1) == [2, 2]
    step = run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in step.iterdir()) == ["rank0.pt", "rank1.pt"]
    assert len(_metrics(run)) == 2 and not (run / "summary.json").exists()


def test_stop_handler_is_not_installed_off_the_main_thread():
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(stop_on_signals().__enter__()))
    t.start()
    t.join()
    assert not got[0].requested and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_the_entry_script_exits_75_after_a_requested_stop(capsys):
    from ghostsys.run.cli import guarded

    def stopped():
        raise Preempted(4, Path("runs/x"), "SIGUSR1")

    assert guarded(stopped) == EXIT_PREEMPTED == 75
    err = capsys.readouterr().err
    assert "stopped on SIGUSR1 at step 4" in err and "resumes" in err
    assert stopped_in(err.encode()) and not stopped_in(b"error: something else at step 4")  # what sweep runs look for


# --- part 6: results readable as the user's umask says ------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_every_results_file_gets_the_mode_the_umask_gives(tmp_path, mask):
    """config/summary (atomic, via mkstemp), metrics (append, truncate), the checker's check.jsonl/csv:
    0666 & ~umask, as a plain open() gives."""
    from ghostsys.check.report import write_rows

    old = os.umask(mask)
    try:
        assert umask() == mask
        run = RunDir(tmp_path / "run")
        write_json_atomic(run.config_path, {"a": 1})
        run.write_summary({"status": "complete"})
        run.append_metrics({"step": 1})
        run.append_metrics({"step": 2})
        run.truncate_metrics_after(1)
        write_rows([], run.path)
        probe = tmp_path / "probe"
        probe.write_text("")  # what a plain open() gives under this umask: the reference
    finally:
        os.umask(old)
    want = stat.S_IMODE(probe.stat().st_mode)
    assert want == 0o666 & ~mask
    for f in ("config.json", "summary.json", "metrics.jsonl", "check.jsonl", "check.csv"):
        assert stat.S_IMODE((run.path / f).stat().st_mode) == want, f


def test_a_real_run_writes_every_file_and_checkpoint_with_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        train(_cfg(tmp_path / "run", checkpoint_every=3))
    finally:
        os.umask(old)
    paths = list((tmp_path / "run").rglob("*"))
    assert {p.name for p in paths} >= {"config.json", "env.json", "summary.json", "metrics.jsonl", "rank0.pt"}
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~0o027
        assert stat.S_IMODE(p.stat().st_mode) == want, p
