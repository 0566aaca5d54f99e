"""Run sweep-table rows (locally or as SLURM array tasks), tell each row's state, collect the results.

A row's results go to ``<results>/<row_id>/`` (its ``--out``). Beside the run's own files the runner
keeps ``attempts.jsonl`` there: one ``start`` and one ``end`` line per attempt (exit code, host,
SLURM job and array ids, restart count, log file), so ``collect`` can say which rows failed, which
were stopped to be resumed, which never ran, and where to look.

States of a row: ``complete`` (summary.json written, or the script's last attempt exited 0: entry
scripts other than launch/run.py need not write a summary), ``failed`` (the last attempt exited non-zero),
``preempted`` (the last attempt stopped on request, exit 75: the same command resumes),
``incomplete`` (started, no end recorded: running now, or killed), ``missing`` (never started).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from ghostsys.run.preempt import EXIT_PREEMPTED, stopped_in
from ghostsys.run.rundir import read_jsonl
from ghostsys.study.sweep import row_command

ATTEMPTS = "attempts.jsonl"
# A rendezvous port picked free can be taken before the launcher binds it (another launch on the node):
# a launch that fails with one of these is retried once on a new port. A real bug fails twice.
PORT_CLASH = ("Address already in use", "EADDRINUSE", "DistNetworkError", "address in use")
# How much of a launch's output is kept to read its stop message and port clashes: torchrun reports a stopped rank
# after rank 0's message in dozens of small writes (a few KB), so the tail is counted in bytes, not writes.
TAIL_BYTES = 65536
_SLURM_VARS = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
               "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_restart_count": "SLURM_RESTART_COUNT",
               "log": "GHOSTSYS_LOG"}


def row_dir(results: str | Path, row: Mapping[str, Any]) -> Path:
    """Where a row's run writes: ``<results>/<row_id>``, whichever job runs it."""
    return Path(results) / str(row["row_id"])


def row_state(results: str | Path, row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's state and what its last attempt left: row_id, state, exit_code, attempts, host, slurm ids, log."""
    d = row_dir(results, row)
    attempts = read_jsonl(d / ATTEMPTS)
    starts = [a for a in attempts if a.get("event") == "start"]
    last_end = next((a for a in reversed(attempts) if a.get("event") == "end"), None)
    last = attempts[-1] if attempts else {}
    out = {"row_id": row["row_id"], "attempts": len(starts), "exit_code": last_end and last_end.get("exit_code")}
    out |= {k: last.get(k) for k in ("host", *_SLURM_VARS) if last.get(k) is not None}
    if (d / "summary.json").exists() or (last.get("event") == "end" and last.get("exit_code") == 0):
        state = "complete"
    elif last.get("event") == "end":
        state = "preempted" if last.get("exit_code") == EXIT_PREEMPTED else "failed"
    elif attempts or (d / "config.json").exists():
        state = "incomplete"
    else:
        state = "missing"
    return out | {"state": state}


def _record(d: Path, event: str, **fields: Any) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rec = {"event": event, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "host": socket.gethostname(), **fields}
    rec |= {k: os.environ[v] for k, v in _SLURM_VARS.items() if os.environ.get(v)}
    with open(d / ATTEMPTS, "a") as f:  # one write per line: a killed attempt never tears an earlier one
        f.write(json.dumps(rec) + "\n")


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (see PORT_CLASH for the race)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], env: Mapping[str, str], sink: BinaryIO) -> tuple[int, bytes]:
    """Run cmd with stdout+stderr copied to `sink` as they come; return its exit code and output tail.

    On Ctrl-C the child (same terminal process group) gets SIGINT too: wait for it, then re-raise.
    """
    tail = bytearray()  # the last TAIL_BYTES bytes, however many writes they came in
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sink.write(chunk)
            sink.flush()
            tail += chunk
            del tail[:-TAIL_BYTES]
    except KeyboardInterrupt:
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    return proc.wait(), bytes(tail)


def run_row(row: Mapping[str, Any], results: str | Path, sink: BinaryIO | None = None) -> int:
    """Run (or resume) one row with its results in ``<results>/<row_id>``; return its exit code.

    0 means the row is complete (an already complete row is not run again); EXIT_PREEMPTED (75)
    that it stopped on request and the same call resumes it. Output goes to `sink` (default stdout).
    """
    d = row_dir(results, row).absolute()
    sink = sink or sys.stdout.buffer
    if row_state(results, row)["state"] == "complete":
        sink.write(f"{row['row_id']}: already complete in {d}\n".encode())
        sink.flush()
        return 0
    for attempt in range(2):
        port = None if row["launcher"] == "python" else free_port()
        cmd, env = row_command(row, d, port=port)
        _record(d, "start", command=cmd, port=port)
        t0 = time.monotonic()
        try:
            code, tail = _spawn(cmd, env, sink)
        except KeyboardInterrupt:
            _record(d, "end", exit_code=130, wall_s=round(time.monotonic() - t0, 3))
            raise
        if code not in (0, EXIT_PREEMPTED) and stopped_in(tail):
            code = EXIT_PREEMPTED  # torchrun / accelerate launch turn the ranks' 75 into 1
        _record(d, "end", exit_code=code, wall_s=round(time.monotonic() - t0, 3))
        clash = port is not None and any(p.encode() in tail for p in PORT_CLASH)
        if code == 0 or not clash or attempt:
            return code
        sink.write(f"rendezvous port {port} was taken; retrying once on another\n".encode())
    return code


def run_rows(rows: list[dict[str, Any]], indices: list[int], results: str | Path, *,
             progress: bool = True) -> int:
    """Run the rows at `indices` one after another, skipping complete ones; 0 when all are complete.

    With one row its output streams to stdout (a SLURM task's log). With several, each row's
    output goes to ``<results>/logs/<row_id>.log`` and a progress bar counts rows; a failed row
    prints its log's tail and the others still run. A stopped row (75) stops the loop: rerun to resume.
    """
    from tqdm import tqdm

    if len(indices) == 1:
        return run_row(rows[indices[0]], results)
    logs = Path(results) / "logs"
    failed: list[str] = []
    bar = tqdm(indices, desc="rows", unit="row", disable=not progress, dynamic_ncols=True)
    for i in bar:
        row = rows[i]
        if row_state(results, row)["state"] == "complete":
            bar.set_postfix_str(f"{row['row_id']}: complete, skipped")
            continue
        bar.set_postfix_str(f"{row['row_id']}: running")
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{row['row_id']}.log"
        with open(log, "ab") as sink:
            code = run_row(row, results, sink)
        if code == EXIT_PREEMPTED:
            bar.close()
            print(f"row {i} ({row['row_id']}) stopped on request; rerun the same command to resume", flush=True)
            return EXIT_PREEMPTED
        if code != 0:
            failed.append(row["row_id"])
            tail = log.read_bytes()[-3000:].decode(errors="replace")
            tqdm.write(f"row {i} ({row['row_id']}) failed with exit code {code}; log {log}:\n{tail}")
    bar.close()
    if failed:
        print(f"{len(failed)} of {len(indices)} rows failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


def collect(rows: list[dict[str, Any]], results: str | Path) -> "pd.DataFrame":  # noqa: F821
    """One row per table row: row_id, state, the table's columns and what ghostsys.study.results.load
    reads from its run (summary and config fields, run_dir); rows that never ran keep their table cells."""
    import pandas as pd

    from ghostsys.study.results import load

    states = pd.DataFrame([row_state(results, r) for r in rows])
    table = pd.DataFrame(rows).rename(columns=lambda c: c if c == "row_id" else f"table.{c}")
    out = states.merge(table, on="row_id", how="left")
    dirs = [row_dir(results, r) for r in rows if row_dir(results, r).is_dir()]
    loaded = load(dirs) if dirs else pd.DataFrame()
    if not loaded.empty:
        loaded["row_id"] = loaded["run_dir"].map(lambda p: Path(p).name)
        loaded = loaded.drop(columns=[c for c in ("status",) if c in loaded.columns])
        out = out.merge(loaded, on="row_id", how="left")
    return out
