"""The sweep driver: every spec through its real launcher as a subprocess, then scaling efficiency and a table."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ghostsys.profile.callback import write_summary_fields
from ghostsys.profile.sweep import ProfileConfig, Spec, expand
from ghostsys.run.config import ConfigError
from ghostsys.run.launchers import free_port, launcher_command, port_clash

TABLE = "profile.csv"
COLUMNS = ("row_id", "mode", "engine", "mixed_precision", "world_size", "scaling", "batch_size", "per_process_batch",
           "nfp", "ghost_groups", "effective_gm", "threads_per_process", "device", "samples_per_s",
           "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "peak_mem_bytes", "mem_per_sample_bytes",
           "collective_share", "exposed_collective_share", "collective_share_grad", "collective_share_syncbn",
           "collective_share_buffer_sync", "collective_share_loss_stats", "collectives_per_step_syncbn",
           "scaling_efficiency", "sampler_overhead_frac", "profiler_cost_frac", "loadavg_1m", "run_dir")


def _summary(spec: Spec) -> dict[str, Any] | None:
    path = Path(spec.run.out) / "summary.json"
    try:
        s = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return s if s.get("profile") else None


def _launch(spec: Spec, script: str, cpu: bool, threads: int, log: Path) -> int:
    """Run one spec under its launcher; its output goes to `log`. Retries once if it lost a port race."""
    for _ in range(2):
        mp = spec.run.mixed_precision if spec.launcher == "accelerate" else "no"
        cmd, extra = launcher_command(spec.launcher, spec.world_size, script, port=free_port(), cpu=cpu,
                                      mixed_precision=mp)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        env.pop("ACCELERATE_MIXED_PRECISION", None)  # only the child's own launcher may set it
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log, "w") as f:
            f.write(" ".join(cmd + list(spec.argv)) + "\n")
            f.flush()
            # Its own session, so that a killed sweep takes the launcher and every rank down with it.
            proc = subprocess.Popen(cmd + list(spec.argv), stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                code = proc.wait()
            finally:
                _stop(proc)
        if code == 0 or not port_clash(log.read_text(errors="replace")):
            return code
    return code


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a launch's whole process group if it is still running (the sweep was interrupted)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_sweep(p: ProfileConfig, script: str | Path) -> int:
    """Profile every spec the flags select, one launch each; returns the exit code (1 if any run failed)."""
    import torch

    specs = expand(p)  # every run validated before anything is written
    cpu = p.device == "cpu" or (p.device == "auto" and not torch.cuda.is_available())
    if cpu and any(s.run.mixed_precision == "fp16" for s in specs):
        raise ConfigError("--mixed-precision fp16 needs a CUDA device and this sweep runs on CPU; use bf16 on CPU")
    if not cpu:
        have = torch.cuda.device_count()
        too_many = sorted({s.world_size for s in specs if s.world_size > have})
        if too_many:
            raise ConfigError(f"--world-sizes asks for {too_many} processes but this node has {have} CUDA device(s); "
                              f"use world sizes <= {have}, or --device cpu")
    logs = p.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a scheduler, `timeout`) unwinds like Ctrl-C, so the running launch is stopped, not orphaned.
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main else None
    try:
        failed = _run_all(specs, p, str(script), cpu)
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
    rows = add_scaling(specs)
    write_table(rows, p.out_dir / TABLE)
    print(markdown(rows))
    print(f"\nrows: {p.out_dir / TABLE}; every run: ghostsys.study.load({str(p.out_dir)!r})")
    if failed:
        print(f"error: {len(failed)} of {len(specs)} profile runs failed: "
              + "; ".join(f"{s.row_id} (log {log})" for s, log in failed), file=sys.stderr)
        return 1
    return 0


def _run_all(specs: list[Spec], p: ProfileConfig, script: str, cpu: bool) -> list[tuple[Spec, Path]]:
    """Launch every spec not yet profiled, under a progress bar; returns the failed ones with their logs."""
    from tqdm import tqdm

    logs = p.out_dir / "logs"
    failed: list[tuple[Spec, Path]] = []
    bar = tqdm(specs, disable=not p.progress, unit="run", desc="profile", dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec.row_id.rsplit("-", 1)[0])
        if _summary(spec) is not None:
            tqdm.write(f"already profiled: {spec.run.out}")
            continue
        if Path(spec.run.out).exists():  # a killed profile run: its timings cannot resume, so it starts over
            tqdm.write(f"incomplete profile run {spec.run.out}: starting it again")
            shutil.rmtree(spec.run.out)
        log = logs / f"{spec.row_id}.log"
        code = _launch(spec, script, cpu, p.threads_per_process, log)
        if code:
            failed.append((spec, log))
            tqdm.write(f"FAILED (exit {code}): {spec.row_id}; last lines of {log}:\n"
                       + "\n".join(log.read_text(errors="replace").splitlines()[-8:]))
    bar.close()
    return failed


def add_scaling(specs: list[Spec]) -> list[dict[str, Any]]:
    """Scaling efficiency of every finished run against its group's one-process run; written into summary.json."""
    done = {s.row_id: (s, sm) for s in specs if (sm := _summary(s)) is not None}
    base = {s.group: (s, sm) for s, sm in done.values() if s.world_size == 1}
    rows = []
    for s, sm in done.values():
        b = base.get(s.group)
        extra: dict[str, Any] = {"scaling": s.scaling, "scaling_efficiency": None, "scaling_base_row": None}
        if b is not None:
            extra.update(scaling_efficiency=sm["samples_per_s"] / (s.world_size * b[1]["samples_per_s"]),
                         scaling_base_row=b[0].row_id, scaling_base_samples_per_s=b[1]["samples_per_s"])
        write_summary_fields(Path(s.run.out), extra)
        rows.append({**s.run.resolved(), **sm, **extra, "run_dir": s.run.out,
                     "loadavg_1m": sm.get("loadavg_1m_start")})
    return rows


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """The run rows' main columns as CSV (every column: ghostsys.study.load on the folder)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "mib":
        return f"{v / 2**20:.0f}"
    if kind == "ms":
        return f"{1000 * v:.1f}"
    if kind == "f":
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep as a markdown table (one line per run)."""
    cols = [("mode", "mode", ""), ("engine", "engine", ""), ("mp", "mixed_precision", ""), ("n", "world_size", ""),
            ("scaling", "scaling", ""), ("M", "batch_size", ""), ("nfp", "nfp", ""), ("G_M", "effective_gm", ""),
            ("thr/proc", "threads_per_process", ""), ("samples/s", "samples_per_s", "f"),
            ("step med ms", "step_time_median_s", "ms"), ("p90 ms", "step_time_p90_s", "ms"),
            ("peak MiB", "peak_mem_bytes", "mib"), ("coll share", "collective_share", "pct"),
            ("exposed", "exposed_collective_share", "pct"), ("grad", "collective_share_grad", "pct"),
            ("syncbn", "collective_share_syncbn", "pct"), ("syncbn colls/step", "collectives_per_step_syncbn", "f"),
            ("scaling eff", "scaling_efficiency", "pct")]
    order = sorted(rows, key=lambda r: (r["engine"], r["mixed_precision"], r["mode"], r["nfp"], r["world_size"], r["scaling"]))
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(key), kind) for _, key, kind in cols) + " |" for r in order]
    return "\n".join(lines)
