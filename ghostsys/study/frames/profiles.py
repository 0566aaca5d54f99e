"""Profile rows (``launch/profile.py``) as one tidy frame, and where they were measured."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ghostsys.study.frames.runs import Paths, runs

if TYPE_CHECKING:
    import pandas as pd


def profiles(paths: Paths) -> "pd.DataFrame":
    """One row per profiled run (launch/profile.py), with `mem_mib` (peak memory) and `machine` (what it ran on)."""
    df = runs(paths, kind="profile")
    if df.empty:
        return df
    df["mem_mib"] = df["peak_mem_bytes"].astype(float) / 2**20
    df["machine"] = [machine(r) for r in df.to_dict("records")]
    return df


PROFILE_TABLE = ("mode", "world_size", "scaling", "nfp", "batch_size", "samples_per_s", "step_time_median_s",
                 "scaling_efficiency", "collective_share", "exposed_collective_share", "mem_mib")


def profile_table(p: "pd.DataFrame") -> "pd.DataFrame":
    """The main columns of profile rows (those present: a run without traced steps has no collectives' share)."""
    cols = [c for c in PROFILE_TABLE if c in p]
    return p.sort_values([c for c in ("mode", "nfp", "world_size") if c in p])[cols].reset_index(drop=True)


def machine(r: dict[str, Any]) -> str:
    """Where and how a profile row was measured: CPU or GPU, threads per process, torch version."""
    dev = r.get("env.gpu") or r.get("env.device_name") if r.get("env.cuda_available") else r.get("env.cpu")
    return f"{dev or r.get('device', '?')}, {r.get('threads_per_process', '?')} thread(s)/process, torch {r.get('env.torch', '?')}"


def measured_on(p: "pd.DataFrame") -> str:
    """The machine(s) of profile rows and the range of the 1-minute load average while they ran."""
    if p.empty:
        return ""
    load = p["loadavg_1m_start"].dropna().astype(float) if "loadavg_1m_start" in p else p.iloc[0:0]
    text = "; ".join(p["machine"].unique())
    return text + (f"; 1-min load {load.min():.1f}..{load.max():.1f}" if len(load) else "")
