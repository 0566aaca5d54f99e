"""Bad input to the entry scripts: one `error:` line naming the flag and the fix, exit 2, nothing written.

The tables of tests/bad_input_cases.py hold the invalid values of EVERY field of RunConfig and
CheckConfig; a field without an entry fails test_every_field_has_cases. The cases run in-process
through launch/run.py's and launch/check.py's ``main(argv)`` (tests/_refusal.py's contract); a few
run through the real launchers, to show the exit code and the single line hold end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ghostsys.check.checker import CHECK_RULES, CheckConfig
from ghostsys.run import dist
from ghostsys.run.config import RULES, RunConfig
from launch.check import main as check_main
from launch.run import main as run_main
from tests._launch import BIN, ROOT, free_port
from tests._mp import run_ranks
from tests._refusal import assert_refused
from tests.bad_input_cases import (CHECK_CASES, GENERAL_CASES, NO_CUDA_CASES, RUN_CASES, fill,
                                   write_fixtures)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _params(table: dict, extra: dict | None = None) -> list:
    rows = [(field, argv, fix) for field, cases in table.items() if not isinstance(cases, str) for argv, fix in cases]
    rows += [(field, argv, fix) for field, cases in (extra or {}).items() for argv, fix in cases]
    return [pytest.param(field, argv, fix, id=f"{field}:{' '.join(argv) or '(empty)'}") for field, argv, fix in rows]


@pytest.mark.parametrize("cls,table,rules", [(RunConfig, RUN_CASES, RULES), (CheckConfig, CHECK_CASES, CHECK_RULES)],
                         ids=["RunConfig", "CheckConfig"])
def test_every_field_has_cases(cls, table, rules):
    """A field added to a config must bring its invalid values (or the reason it has none) and its rule."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in table]
    assert not missing, (f"{cls.__name__} fields without bad-input cases: {missing}. Add to tests/bad_input_cases.py "
                         f'e.g. "{missing[0]}": [(["{_flag(missing[0])}", "<bad value>"], "<words of the fix>")], '
                         "or a string saying why the field has no invalid value")
    assert not set(table) - set(names), f"cases for fields {cls.__name__} no longer has: {set(table) - set(names)}"
    assert all(table[n] for n in names), "every entry holds cases or a reason"
    assert sorted(rules) == sorted(names), f"every {cls.__name__} field needs a rule: {set(names) ^ set(rules)}"


class _Fixtures:
    """The prepared files the cases point at ({F}), outside the working directory; they must not change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        write_fixtures(root)
        self.before = self._snapshot()

    def _snapshot(self) -> dict[str, bytes | None]:
        return {str(p.relative_to(self.root)): (p.read_bytes() if p.is_file() else None) for p in self.root.rglob("*")}

    def assert_unchanged(self) -> None:
        assert self._snapshot() == self.before, "a refused run changed the prepared files"


@pytest.fixture
def fixtures(tmp_path: Path) -> _Fixtures:
    return _Fixtures(tmp_path / "F")


@pytest.fixture(scope="module")
def imported():
    """Import torchvision once up front: its first import sets env vars itself (TORCHINDUCTOR_CACHE_DIR), not a run."""
    from ghostsys._compat import import_torchvision

    with warnings.catch_warnings():  # the shim's one-time warning, if an earlier test did not import it already
        warnings.simplefilter("ignore", RuntimeWarning)
        import_torchvision()


@pytest.fixture
def no_leftover_state(imported):
    """In-process refusals must leave no process group, env var or thread setting behind (the RNG is restored)."""
    def env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own

    before, threads = env(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    assert not dist.is_initialized(), "a refused run left a process group behind"
    assert env() == before, f"a refused run changed env vars: {set(env().items()) ^ set(before.items())}"
    assert torch.get_num_threads() == threads


def _refuse(main, field: str, argv: list[str], fix: str, tmp_path: Path, capsys, fixtures: _Fixtures) -> None:
    line = assert_refused(main, fill(argv, fixtures.root), tmp_path / "cwd", capsys, expect=_flag(field))
    assert fix.lower() in line.lower(), f"{argv}: the error line lacks the fix {fix!r}: {line}"
    fixtures.assert_unchanged()


@pytest.mark.parametrize("field,argv,fix", _params(RUN_CASES, None if torch.cuda.is_available() else NO_CUDA_CASES))
def test_run_refuses(field, argv, fix, tmp_path, capsys, fixtures, no_leftover_state):
    _refuse(run_main, field, argv, fix, tmp_path, capsys, fixtures)


@pytest.mark.parametrize("field,argv,fix", _params(CHECK_CASES))
def test_check_refuses(field, argv, fix, tmp_path, capsys, fixtures, no_leftover_state):
    _refuse(check_main, field, argv, fix, tmp_path, capsys, fixtures)


@pytest.mark.parametrize("main", [run_main, check_main], ids=["run", "check"])
@pytest.mark.parametrize("argv,names", GENERAL_CASES, ids=[" ".join(a) for a, _ in GENERAL_CASES])
def test_malformed_command_lines_are_one_line(main, argv, names, tmp_path, capsys, no_leftover_state):
    line = assert_refused(main, argv, tmp_path, capsys, expect=names)
    assert "--help" in line


# --- through the real launchers ---------------------------------------------------------------


def _launch(cmd: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_python_launch_prints_one_line_and_exits_2(tmp_path):
    proc = _launch([sys.executable, str(ROOT / "launch/run.py"), "--lr", "nan"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: --lr nan"), proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.dist
def test_torchrun_refusal_after_the_process_group_exists(tmp_path):
    """Found by build() on both ranks after init: one line (rank 0's), exit 2, nothing written.

    torchrun itself then reports the failed workers (its ChildFailedError block) and exits 1: that
    report is the launcher's, outside ghostsys. It stops the other workers as soon as one fails, so a
    rank still on its way to exit 2 may show SIGTERM (-15) there; test_a_refusal_on_one_rank_stops_every_rank
    shows each rank exits 2 on its own.
    """
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "launch/run.py"),
           "--mode", "unsynced", "--nprocs", "2", "--batch-size", "100000"]
    proc = _launch(cmd, tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: --batch-size 100000 exceeds the 4096 training samples of synthetic; use at most 4096"], proc.stderr
    assert proc.returncode != 0
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert not list(tmp_path.iterdir())


def _one_rank_refuses(rank: int, world: int, where: str) -> tuple[int, str]:
    """Rank 1 alone asks for more samples than the data set has (as if a file were missing on its node)."""
    os.chdir(Path(where) / f"rank{rank}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(["--mode", "unsynced", "--nprocs", "2", "--batch-size", "100000" if rank == 1 else "64",
                         "--no-progress", "--collective-timeout", "60"])
    return code, err.getvalue()


@pytest.mark.dist
def test_a_refusal_on_one_rank_stops_every_rank(tmp_path):
    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()
    (c0, e0), (c1, e1) = run_ranks(_one_rank_refuses, 2, str(tmp_path), init=False, timeout_s=60)
    assert (c0, c1) == (2, 2)
    assert e0.strip() == "error: --batch-size 100000 exceeds the 4096 training samples of synthetic; use at most 4096 (on rank 1)"
    assert e1 == ""
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# --- a failure after the directory is claimed, before the first step ----------------------------


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def _fail_before_step_one(rank: int, world: int, root: str) -> dict[str, dict]:
    """Real runs whose callback fails at on_train_start (after the claim, before any step): the trees they leave."""
    from ghostsys.run.train import Callback, TrainingError, train

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var)  # a plain `python launch/run.py` process, as users start most runs

    class Boom(Callback):
        def on_train_start(self, s, start_step):
            raise TrainingError("boom")

    base = Path(root)
    cfg = RunConfig(batch_size=32, max_steps=2, progress=False)
    with pytest.raises(TrainingError, match="boom"):  # a fresh directory, two levels of new parents
        train(cfg.replace(out=str(base / "runs/new/deeper/run")), callbacks=[Boom()])
    fresh = _tree(base)
    killed = base / "killed"  # an earlier run of the same experiment, killed after its last checkpoint
    train(cfg.replace(out=str(killed)))
    (killed / "summary.json").unlink()
    before = _tree(killed)
    with pytest.raises(TrainingError, match="boom"):
        train(cfg.replace(out=str(killed)), callbacks=[Boom()])
    return {"fresh": fresh, "before": before, "after": _tree(killed)}


def test_a_run_that_never_took_a_step_leaves_nothing_new(tmp_path):
    (tmp_path / "runs/neighbour").mkdir(parents=True)  # another run's folder beside ours must stay
    [got] = run_ranks(_fail_before_step_one, 1, str(tmp_path), init=False, timeout_s=300)
    assert got["fresh"] == {"runs": None, "runs/neighbour": None}
    before, after = got["before"], got["after"]
    assert {"config.json", "metrics.jsonl", "checkpoints/step_00000002/rank0.pt"} <= set(before), sorted(before)
    changed = {k for k in before if k not in ("config.json", "env.json") and before[k] != after.get(k)}  # rewritten
    assert set(after) == set(before) and not changed, (sorted(before), sorted(after), changed)
