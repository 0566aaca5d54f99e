"""launch/sweep.py run | submit | collect without a cluster: bad input, local runs, the sbatch commands, the
multi-node template's per-node commands (golden), and the batch scripts' signal plumbing (slurm/lib.sh)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from ghostsys.study.sweep import REPO_ROOT, make_row, write_table
from launch.sweep import main
from tests._refusal import assert_refused

GOLDEN = Path(__file__).parent / "golden"
TINY = {"batch_size": 32, "max_steps": 2, "progress": False}


def _table(path: Path, rows: list[dict]) -> Path:
    return write_table(rows, path)


def _raw(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def tables(tmp_path_factory) -> dict[str, Path]:
    """Tables outside the refusal test's empty working folder (which must stay empty)."""
    d = tmp_path_factory.mktemp("tables")
    good = _table(d / "good.csv", [make_row({"mode": "layer", "ghost_groups": 2, **TINY}, name="ok")])
    return {
        "good": good,
        "no_columns": _raw(d / "no_columns.csv", "mode,nfp\naccumulate,2\n"),
        "empty": _raw(d / "empty.csv", "row_id,launcher,nprocs,script\n"),
        "dup": _raw(d / "dup.csv", "row_id,launcher,nprocs,script\na,python,1,\na,python,1,\n"),
        "bad_id": _raw(d / "bad_id.csv", "row_id,launcher,nprocs,script\na/b,python,1,\n"),
        "bad_launcher": _raw(d / "bad_launcher.csv", "row_id,launcher,nprocs,script\na,mpirun,1,\n"),
        "python_2": _raw(d / "python_2.csv", "row_id,launcher,nprocs,script\na,python,2,\n"),
        "no_script": _raw(d / "no_script.csv", "row_id,launcher,nprocs,script\na,python,1,launch/nope.py\n"),
        "typo_flag": _raw(d / "typo_flag.csv", "row_id,launcher,nprocs,script,nfpp\na,python,1,,2\n"),
        "bad_value": _raw(d / "bad_value.csv", "row_id,launcher,nprocs,script,nfp\na,python,1,,two\n"),
        "bad_config": _raw(d / "bad_config.csv", "row_id,launcher,nprocs,script,batch_size\na,torchrun,4,,30\n"),
        "site_ok": _raw(d / "site_ok.ini", "[slurm]\npartition = gpu\n"),
        "site_key": _raw(d / "site_key.ini", "[slurm]\npartiton = gpu\n"),
        "site_section": _raw(d / "site_section.ini", "[cluster]\npartition = gpu\n"),
        "site_int": _raw(d / "site_int.ini", "[slurm]\nthrottle = many\n"),
        "site_garbage": _raw(d / "site_garbage.ini", "partition = gpu\n"),
    }


REFUSED = [  # (argv with {table} placeholders, what the error line must name)
    (["run", "{missing}"], "does not exist"),
    (["run", "{no_columns}"], "missing column"),
    (["run", "{empty}"], "no rows"),
    (["run", "{dup}"], "share row_id"),
    (["run", "{bad_id}"], "row_id 'a/b'"),
    (["run", "{bad_launcher}"], "launcher 'mpirun'"),
    (["run", "{python_2}"], "use torchrun"),
    (["run", "{no_script}"], "launch/nope.py"),
    (["run", "{typo_flag}"], "--nfpp"),
    (["run", "{bad_value}"], "'two'"),
    (["run", "{bad_config}"], "nprocs 4: --batch-size M=30 is not divisible by the 4"),
    (["run", "{good}", "--row", "1"], "--row 1 is out of range"),
    (["run", "{good}", "--row", "x"], "--row"),
    (["collect", "{missing}"], "does not exist"),
    (["collect", "{good}", "--csv", "{nowhere}/out.csv"], "--csv"),
    (["submit", "{missing}"], "does not exist"),
    (["submit", "{good}", "--site", "{nowhere}/site.ini"], "--site"),
    (["submit", "{good}", "--site", "{site_key}"], "unknown key 'partiton'"),
    (["submit", "{good}", "--site", "{site_section}"], "[slurm]"),
    (["submit", "{good}", "--site", "{site_int}"], "throttle"),
    (["submit", "{good}", "--site", "{site_garbage}"], "not an INI file"),
    (["submit", "{good}", "--throttle", "-1"], "--throttle -1"),
    (["submit", "{good}", "--cpus-per-proc", "0"], "--cpus-per-proc 0"),
    (["submit", "{good}", "--gpus-per-proc", "two"], "--gpus-per-proc"),
    (["submit", "{good}", "--setup", "{nowhere}/activate"], "--setup"),
    (["submit", "{good}", "--sbatch=--comment 'open"], "--sbatch"),
    (["submit", "{good}", "--site", "{site_ok}", "--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv,expect", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_input_is_refused_with_one_error_and_nothing_written(argv, expect, tables, tmp_path, capsys):
    names = {**{k: str(v) for k, v in tables.items()}, "missing": str(tmp_path / "missing.csv"),
             "nowhere": str(tmp_path / "nowhere")}
    assert_refused(main, [a.format(**names) for a in argv], tmp_path / "cwd", capsys, expect)


def test_submit_without_sbatch_names_the_fix(tables, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert_refused(main, ["submit", str(tables["good"])], tmp_path / "cwd", capsys, "sbatch is not on PATH")


def test_submit_dry_run_prints_one_array_per_process_count_with_the_site_options(tmp_path, capsys, monkeypatch):
    rows = [make_row({"nfp": n, **TINY}, name=f"r{n}") for n in (1, 2, 4)]
    rows += [make_row({"mode": "unsynced", **TINY}, name="two", launcher="torchrun", nprocs=2)]
    rows += [make_row({"nfp": 8, **TINY}, name="r8")]
    table = _table(tmp_path / "t.csv", rows)
    site = _raw(tmp_path / "site.ini", """
        [slurm]
        partition = gpu
        account = proj
        time = 01:00:00
        gpus_per_proc = 1
        cpus_per_proc = 4
        modules = cuda/12.4 nccl
        sbatch = --mem=16G
        """)
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(table), "--site", str(site), "--throttle", "3", "--time", "00:30:00", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not (tmp_path / "runs").exists()  # a dry run writes nothing
    words = [shlex.split(line) for line in lines]
    env = dict(w.split("=", 1) for w in words[0][:words[0].index("sbatch")])  # NAME=value before the command
    assert env["GHOSTSYS_MODULES"] == "cuda/12.4 nccl" and env["GHOSTSYS_PYTHON"] == sys.executable
    results = tmp_path / "runs" / "sweeps" / "t"
    common = [f"--output={results}/logs/%A_%a.out", "--open-mode=append", f"--chdir={tmp_path}", "--export=ALL",
              "--nodes=1", "--ntasks=1"]
    one, two = (w[w.index("sbatch"):] for w in words)
    assert one[:4] == ["sbatch", "--parsable", one[2], "--array=0-2,4%3"] and one[2].startswith("--job-name=ghostsys-t-")
    assert one[4:10] == common and two[4:10] == common
    assert one[10:] == ["--cpus-per-task=4", "--requeue", "--signal=B:USR1@120", "--gres=gpu:1", "--partition=gpu",
                        "--account=proj", "--time=00:30:00", "--mem=16G", str(REPO_ROOT / "slurm" / "array.sh"),
                        str(table), str(results)]  # the flag's --time beats the site file's
    assert two[3] == "--array=3%3" and two[10:12] == ["--cpus-per-task=8", "--requeue"] and "--gres=gpu:2" in two


def test_local_run_resumes_skips_complete_rows_and_collect_names_failed_and_missing_ones(tmp_path, capsys):
    ok = make_row({"mode": "layer", "ghost_groups": 2, **TINY}, name="ok")
    # passes every up-front check but fails at run time: the batch exceeds the synthetic training set
    failing = make_row({**TINY, "batch_size": 10**7}, name="too-big")
    never = make_row({"nfp": 2, **TINY}, name="never-run")
    table = _table(tmp_path / "t.csv", [ok, failing, never])
    results = tmp_path / "res"
    assert main(["run", str(table), "--results", str(results), "--row", "0", "--row", "1", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "row 1 (too-big" in out and "exceeds" in out  # the failed row's log tail is shown
    assert (results / "logs" / f"{failing['row_id']}.log").exists()
    attempts = results / ok["row_id"] / "attempts.jsonl"
    before = attempts.read_text()
    assert main(["run", str(table), "--results", str(results), "--row", "0"]) == 0  # complete: not run again
    assert attempts.read_text() == before and "already complete" in capsys.readouterr().out
    assert main(["collect", str(table), "--results", str(results)]) == 1
    out, err = capsys.readouterr()
    assert f"failed: {failing['row_id']}, exit 2" in err and f"missing: {never['row_id']}" in err
    df = pd.read_csv(results / "results.csv")
    assert list(df["state"]) == ["complete", "failed", "missing"] and df.loc[0, "effective_gm"] == 2
    assert df.loc[0, "run_dir"] == str(results / ok["row_id"]) and df.loc[2, "table.nfp"] == 2


# A launcher's report of a stopped rank as torchrun writes it: rank 0's message, then many small writes.
STOPPED_THEN_CHATTY = """
import sys, time
print("stopped: stopped on SIGUSR1 at step 3 with a checkpoint in /x/checkpoints; the same command resumes", flush=True)
for i in range(200):
    print(f"  traceback line {i}", file=sys.stderr, flush=True)
    time.sleep(0.003)  # each line its own read on the other side, as a launcher's report arrives
sys.exit(1)  # what torchrun exits with when a rank exits 75
"""


def test_a_stop_is_recognized_however_many_writes_follow_its_message(tmp_path):
    """The stop message must survive in the kept tail of the output even when hundreds of writes follow it
    (seen: torchrun's failure report after a rank's stop, then the task counted as failed, not preempted)."""
    from ghostsys.run.preempt import EXIT_PREEMPTED
    from ghostsys.study.runner import run_row, row_state

    script = _raw(tmp_path / "stops.py", STOPPED_THEN_CHATTY)
    row = make_row({}, name="stops", script=str(script))
    with open(tmp_path / "log", "wb") as sink:
        assert run_row(row, tmp_path / "res", sink) == EXIT_PREEMPTED
    assert row_state(tmp_path / "res", row)["state"] == "preempted"


def test_a_row_runs_the_same_from_any_working_directory(tmp_path):
    from ghostsys.study.sweep import row_command

    row = make_row({"nfp": 2}, name="x", launcher="torchrun", nprocs=2)
    cmd, _ = row_command(row, "res/x", port=1234, cpu=True)
    assert str(REPO_ROOT / "launch" / "run.py") in cmd and cmd[-1] == str(Path.cwd() / "res" / "x")


# --- the multi-node template ---------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) expands the node list")
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun", "deepspeed"])
def test_multinode_template_commands_for_two_nodes_match_the_golden_file(launcher, tmp_path):
    """What srun would start on each of 2 nodes (4 processes each), from SLURM's own variables."""
    conf = _raw(tmp_path / "slurm.conf", "ClusterName=golden\nSlurmctldHost=localhost\n")
    env = {"PATH": os.environ["PATH"], "SLURM_CONF": str(conf), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "GHOSTSYS_PROCS_PER_NODE": "4", "GHOSTSYS_DRY_RUN": "1",
           "GHOSTSYS_ROOT": str(REPO_ROOT), "TMPDIR": "/tmp"}
    proc = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "multinode.sh"), launcher, "launch/run.py", "--mode",
                           "syncbn", "--nprocs", "8", "--out", "runs/syncbn-8"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    golden = GOLDEN / f"multinode_2nodes_{launcher}.txt"
    assert proc.stdout == golden.read_text(), f"{proc.stdout}\n!= {golden}"


# --- slurm/lib.sh: the stop request's way to every rank, the requeue cap ----------------------------

RANK = """
import os, signal, sys, time
# A 'rank' in a session of its own (as torchrun starts them) that acts on SIGUSR1 only once its handler is in.
os.setsid()
time.sleep(float(sys.argv[2]))  # still starting up: USR1 is ignored (inherited from the launcher)
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
open(sys.argv[1], "w").write("ready")
while not got:
    time.sleep(0.01)
sys.exit(75)
"""
LAUNCHER = """
import subprocess, sys
# A 'launcher': starts the rank and reports its exit code (USR1 is ignored here: inherited).
sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1], *sys.argv[2:]]))
"""


def test_usr1_reaches_a_rank_in_its_own_session_even_one_still_starting_and_the_shell_sees_its_exit(tmp_path):
    ready = tmp_path / "ready"
    script = f"""
        source {REPO_ROOT}/slurm/lib.sh
        GHOSTSYS_RESEND_S=0.2
        (sleep 0.5; kill -USR1 $$) &   # the signal comes while the rank is still starting up
        ghostsys_run {sys.executable} -c {shlex.quote(LAUNCHER)} {shlex.quote(RANK)} {ready} 1.5
        echo "rc=$? stop=$GHOSTSYS_STOP"
    """
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith("rc=75 stop=1"), proc.stdout + proc.stderr
    assert ready.read_text() == "ready" and "asking the run to checkpoint" in proc.stderr
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("restarts,requeues", [("", True), ("1", True), ("2", False)])
def test_a_stopped_task_requeues_only_itself_and_only_below_the_cap(restarts, requeues):
    """Array task 77_3 does not exist on any cluster here: scontrol's refusal shows the attempt, never a requeue
    of anything real (the real requeue runs in tests/test_slurm.py)."""
    env = {"PATH": os.environ["PATH"], "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "80",
           "GHOSTSYS_MAX_REQUEUES": "2", **({"SLURM_RESTART_COUNT": restarts} if restarts else {})}
    script = f"source {REPO_ROOT}/slurm/lib.sh; GHOSTSYS_STOP=1; ghostsys_requeue_if_stopped 1; echo back"
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "back"
    if requeues:  # this array task only, never the whole array (77) or the task's job id (80)
        assert "requeueing 77_3 (requeue" in proc.stderr and "scontrol requeue 77_3 failed" in proc.stderr
    else:
        assert "not requeueing" in proc.stderr and "requeueing 77_3" not in proc.stderr
    # no stop request, or a run that finished: nothing to requeue, not a word
    for stop, rc in ((0, 1), (1, 0)):
        script = f"source {REPO_ROOT}/slurm/lib.sh; GHOSTSYS_STOP={stop}; ghostsys_requeue_if_stopped {rc}; echo back"
        quiet = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert quiet.stdout.strip() == "back" and not quiet.stderr
