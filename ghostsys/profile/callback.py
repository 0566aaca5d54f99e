"""The profiler as a callback of the one training loop: timed steps, memory, NVML, collectives' share.

A profiled run's steps fall in four stretches (DESIGN §6, §9)::

    [0, W)          warm-up: excluded from every figure
    [W, W+T)        timed: step times, the wall-clock window, memory peaks, NVML samples
    [W+T, W+T+P)    profiled: torch.profiler traces them (kept apart: the profiler slows steps down)
    W+T+P           tail: the loop's final evaluation and checkpoint, outside every figure

The window's clocks are read with the device synchronized, at the start of step W and of step W+T,
so the window holds everything the loop does per step (data, forward, backward, update, the loop's
metrics line). Global samples/s = samples in the window / the slowest rank's window. The run's step
times are the slowest rank's at each step (median, p10, p90); each rank's own go on its per-rank row.
The profiler's cost on timed steps (time inside these hooks plus the NVML thread's CPU time, over the
window) and the torch.profiler's own cost (profiled vs timed median step time) go on the row too.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import torch

from ghostsys.profile.collectives import STEP_RANGE, analyze
from ghostsys.profile.samplers import MemoryWindow, NvmlSampler
from ghostsys.run import dist
from ghostsys.run.config import ConfigError
from ghostsys.run.rundir import environment, write_json_atomic
from ghostsys.run.train import Callback, Setup

RANK_ROWS = "profile_ranks.jsonl"  # one line per rank, beside summary.json


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty list."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ProfileCallback(Callback):
    """Measures one run from above, through the loop's hooks; results extend the summary row."""

    def __init__(self, warmup: int, timed: int, profiled: int, *, meta: dict[str, Any] | None = None) -> None:
        if warmup < 1 or timed < 1 or profiled < 0:
            raise ValueError(f"need warmup >= 1, timed >= 1, profiled >= 0 (got {warmup}, {timed}, {profiled})")
        self.W, self.T, self.P = warmup, timed, profiled
        self.meta = dict(meta or {})
        self.step_times: list[float] = []
        self.profiled_times: list[float] = []
        self.hook_s = 0.0  # time spent in these hooks during the timed window
        self.loadavg: float | None = None  # the machine's 1-minute load when the window opened
        self._t0 = self._t1 = 0.0
        self._prof: Any = None
        self._range: Any = None
        self.window: dict[str, Any] = {}
        self.trace: dict[str, Any] = {}

    @property
    def total_steps(self) -> int:
        """Steps the run needs: warm-up + timed + profiled + the tail step."""
        return self.W + self.T + self.P + 1

    def on_train_start(self, s: Setup, start_step: int) -> None:
        """Refuse a resumed run: its timings would mix two processes' lives."""
        if start_step:
            raise ConfigError(f"{s.cfg.run_dir()} holds a partial run (checkpoint at step {start_step}); a profile "
                              "cannot resume: remove that directory or pass another --out")
        if s.total_steps != self.total_steps:
            raise ConfigError(f"the run has {s.total_steps} steps but the profile needs {self.total_steps} "
                              f"({self.W} warm-up + {self.T} timed + {self.P} profiled + 1)")
        self.device = s.info.device
        self.memory = MemoryWindow(self.device)
        self.nvml = NvmlSampler(self.device)

    def on_step_start(self, s: Setup, step: int) -> None:
        """Open the window after warm-up; close it and start the trace after the timed steps."""
        t = time.perf_counter()
        W, T = self.W, self.T
        if step == W:
            _sync(self.device)
            self.memory.start()
            self.nvml.start()
            self.loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            self._t0 = time.perf_counter()
            return  # the window starts here: nothing above counts as hook time
        if step == W + T:
            _sync(self.device)
            self._t1 = time.perf_counter()
            self.window = self.memory.stop() | self.nvml.stop(T)
            if self.P:
                self._start_trace()
        if W + T <= step < W + T + self.P:
            self._range = torch.profiler.record_function(STEP_RANGE)
            self._range.__enter__()
        elif W < step < W + T:
            self.hook_s += time.perf_counter() - t

    def on_step_end(self, s: Setup, step: int, record: dict[str, Any]) -> None:
        """Collect the step's time (the loop's synchronized clock around train_step)."""
        t = time.perf_counter()
        W, T, P = self.W, self.T, self.P
        if W <= step < W + T:
            self.step_times.append(float(record["step_time_s"]))
            self.hook_s += time.perf_counter() - t
        elif W + T <= step < W + T + P:
            self.profiled_times.append(float(record["step_time_s"]))
            _sync(self.device)
            self._range.__exit__(None, None, None)
            if step == W + T + P - 1:
                self._prof.stop()
                self.trace = analyze(self._prof.events())
                self._prof = None

    def _start_trace(self) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts)
        self._prof.start()

    def rank_row(self, s: Setup) -> dict[str, Any]:
        """This rank's figures."""
        t = self.step_times
        window_s = self._t1 - self._t0
        row = {"rank": s.info.rank, "window_s": window_s, "timed_steps": len(t),
               "step_time_median_s": statistics.median(t), "step_time_p10_s": quantile(t, 0.1),
               "step_time_p90_s": quantile(t, 0.9),
               "rank_samples_per_s": s.cfg.per_process_batch * len(t) / window_s,
               "hook_s": self.hook_s, "nvml_thread_cpu_s": self.nvml.cpu_s,
               "sampler_overhead_frac": (self.hook_s + self.nvml.cpu_s) / window_s,
               "profiled_step_times_s": self.profiled_times, "step_times_s": t,
               "threads_per_process": torch.get_num_threads(), "device": str(self.device),
               "loadavg_1m_start": self.loadavg}
        row |= self.window
        if row.get("peak_mem_bytes") is not None:
            row["mem_per_sample_bytes"] = row["peak_mem_bytes"] / s.cfg.per_process_batch
        else:
            row["mem_per_sample_bytes"] = None
        return row | self.trace

    def on_train_end(self, s: Setup, summary: dict[str, Any]) -> None:
        """Gather every rank's row; the run row joins the summary, per-rank rows go to profile_ranks.jsonl."""
        rows = dist.all_gather_object(self.rank_row(s))
        summary.update(run_row(rows, s.cfg.batch_size, self.meta))
        if s.info.is_main:
            env = environment()
            summary["env"] = env
            path = s.cfg.run_dir() / RANK_ROWS
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps({**r, **self.meta, "env": env}) + "\n" for r in rows))
            tmp.replace(path)


def run_row(rows: list[dict[str, Any]], batch_size: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's row from its ranks' rows: measured global throughput, slowest-rank step times, worst peaks."""
    n_steps = min(r["timed_steps"] for r in rows)
    slowest = [max(r["step_times_s"][i] for r in rows) for i in range(n_steps)]
    window = max(r["window_s"] for r in rows)

    def worst(key: str) -> Any:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return max(vals) if vals else None

    def mean(key: str) -> Any:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    main = rows[0]
    prof_med = statistics.median(main["profiled_step_times_s"]) if main["profiled_step_times_s"] else None
    row: dict[str, Any] = {
        "profile": True, **meta,
        "world_size": len(rows), "threads_per_process": main["threads_per_process"], "device": main["device"],
        "samples_per_s": batch_size * n_steps / window, "window_s": window, "timed_steps": n_steps,
        "step_time_median_s": statistics.median(slowest), "step_time_p10_s": quantile(slowest, 0.1),
        "step_time_p90_s": quantile(slowest, 0.9),
        "peak_mem_bytes": worst("peak_mem_bytes"), "peak_mem_reserved_bytes": worst("peak_mem_reserved_bytes"),
        "peak_rss_bytes": worst("peak_rss_bytes"), "alloc_retries": worst("alloc_retries"),
        "mem_per_sample_bytes": worst("mem_per_sample_bytes"), "peak_mem_kind": main.get("peak_mem_kind"),
        "sampler_overhead_frac": worst("sampler_overhead_frac"),
        "profiler_cost_frac": (prof_med / statistics.median(main["step_times_s"]) - 1) if prof_med else None,
    }
    for key in ("nvml_gpu_util_mean_pct", "nvml_power_mean_w", "nvml_energy_per_step_j"):
        row[key] = mean(key)
    row["nvml_mem_used_max_bytes"] = worst("nvml_mem_used_max_bytes")
    row["nvml_note"] = main.get("nvml_note")
    # The collectives' share: the mean over ranks (each rank's trace is its own view of the same steps).
    for key in [k for k in main if k.startswith(("collective_share", "exposed_collective_share", "collectives_per_step"))]:
        row[key] = mean(key)
    for key in ("collective_backend", "collective_note", "profiled_steps", "mem_note", "loadavg_1m_start"):
        if main.get(key) is not None:
            row[key] = main[key]
    return row


def write_summary_fields(run_dir: Any, fields: dict[str, Any]) -> None:
    """Add fields to a finished run's summary.json (atomically), e.g. the sweep's scaling efficiency."""
    path = run_dir / "summary.json"
    write_json_atomic(path, json.loads(path.read_text()) | fields)
