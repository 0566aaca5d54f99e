"""ghostsys.run.cli.exit_process: an entry script's exit, without interpreter finalization once it joined a group.

Why it exists is in ghostsys.run.dist.exit_if_joined (gloo worker threads abort a finalizing interpreter). The
race itself needs a loaded machine and is not reproducible on demand, so these tests pin the contract instead:
the exit code and messages are what `sys.exit(main())` gives, the atexit handlers run and buffered output is
flushed; a joined process skips finalization (a module-global object's __del__ never runs) and one that never
joined finalizes as usual (the negative control: the same probe fires).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests._launch import ROOT

SCRIPT = textwrap.dedent("""
    import atexit, sys
    from ghostsys.run import dist
    from ghostsys.run.cli import exit_process

    class Probe:
        def __del__(self):
            print("finalized", flush=True)

    probe = Probe()  # a module global: only interpreter finalization deletes it
    atexit.register(lambda: print("atexit ran"))

    def main():
        if {join}:
            dist.init_single_process_group()
        print("buffered", end="")  # no newline, no flush: only an orderly exit writes it
        {action}

    exit_process(main)
""")

# action -> (exit code, text stderr must contain)
ACTIONS = {"return 3": (3, ""), "raise ValueError('boom')": (1, "ValueError: boom"),
           "sys.exit('bad things')": (1, "bad things"), "sys.exit(None)": (0, "")}


def _run(join: bool, action: str) -> subprocess.CompletedProcess:
    code = SCRIPT.format(join=join, action=action)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


# Every action once joined; a normal return and a bug once never joined (the negative control's cases).
CASES = [(True, a) for a in sorted(ACTIONS)] + [(False, "return 3"), (False, "raise ValueError('boom')")]


@pytest.mark.parametrize(("join", "action"), CASES, ids=[f"{'joined' if j else 'never-joined'}-{a}" for j, a in CASES])
def test_exit_process_keeps_sys_exit_semantics(join: bool, action: str) -> None:
    proc = _run(join, action)
    rc, err_text = ACTIONS[action]
    assert proc.returncode == rc, proc.stderr
    assert err_text in proc.stderr
    assert "buffered" in proc.stdout and "atexit ran" in proc.stdout
    if action.startswith("raise"):
        assert "Traceback (most recent call last)" in proc.stderr
    # Finalization: skipped once joined, as usual otherwise (the negative control).
    assert ("finalized" in proc.stdout) is (not join), proc.stdout
