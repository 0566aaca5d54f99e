"""Submit a sweep table to SLURM as array jobs: task i runs row i through ``slurm/array.sh``.

Site settings (partition, account, time, GPUs, modules, ...) come from flags or one small INI file
(``--site``, default ``slurm/site.ini`` when it exists; see ``slurm/site.example.ini``), never from
edits inside the batch scripts. Rows are grouped by process count: each group is one array job whose
tasks ask for ``nprocs × cpus_per_proc`` cores and ``nprocs × gpus_per_proc`` GPUs on one node, with
``--array`` listing that group's row indices (``0-3,7%K``), so a task's index is its row's index.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from ghostsys.study.sweep import REPO_ROOT, SweepError

ARRAY_SCRIPT = REPO_ROOT / "slurm" / "array.sh"
DEFAULT_SITE = REPO_ROOT / "slurm" / "site.ini"


@dataclass(frozen=True)
class Site:
    """What a cluster needs in every submission; one flag each, or a key of the [slurm] section of --site."""

    partition: str = ""
    """Partition (sbatch --partition); empty = the cluster's default."""
    account: str = ""
    """Account to charge (sbatch --account)."""
    qos: str = ""
    """Quality of service (sbatch --qos)."""
    time: str = ""
    """Time limit per task, e.g. 04:00:00 (sbatch --time); empty = the partition's default."""
    constraint: str = ""
    """Node features (sbatch --constraint), e.g. a100."""
    cpus_per_proc: int = 1
    """CPU cores per training process: a task asks for nprocs x this (--cpus-per-task)."""
    gpus_per_proc: int = 0
    """GPUs per training process: a task asks for nprocs x this (--gres); 0 on CPU clusters."""
    gpu_gres: str = "gpu"
    """The GPU gres name: gpu, or gpu:<type> such as gpu:a100."""
    throttle: int = 0
    """Most tasks of one array running at once (--array=...%K); 0 = as many as the cluster gives."""
    signal_seconds: int = 120
    """SIGUSR1 this many seconds before the time limit: the run checkpoints and the task requeues."""
    max_requeues: int = 3
    """Requeues of one task after a stop request, counted by SLURM_RESTART_COUNT; then it fails."""
    modules: str = ""
    """Environment modules loaded before a task runs (space-separated), e.g. cuda/12.4 nccl."""
    setup: str = ""
    """A shell file each task sources before running (a venv or conda activation)."""
    python: str = ""
    """Python interpreter on the compute nodes; empty = the one running submit."""
    sbatch: str = ""
    """Further sbatch options, as typed on a command line (e.g. --mem=32G --exclusive)."""


def site_fields() -> list[dataclasses.Field]:
    """The Site fields in declaration order (one flag and one INI key each)."""
    return list(fields(Site))


def load_site(path: str | Path | None, overrides: dict[str, Any]) -> Site:
    """Site settings: dataclass defaults < the INI file's [slurm] section < flags given (non-None overrides)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SweepError(f"--site {path} does not exist; copy slurm/site.example.ini there or drop --site")
        ini = configparser.ConfigParser(interpolation=None)
        try:
            ini.read(path)
        except configparser.Error as err:
            raise SweepError(f"--site {path} is not an INI file ({err.__class__.__name__}); see slurm/site.example.ini") from None
        if not ini.has_section("slurm"):
            raise SweepError(f"--site {path} has no [slurm] section; put its keys under [slurm]")
        known = {f.name: f for f in site_fields()}
        for key, raw in ini.items("slurm"):
            if key not in known:
                raise SweepError(f"--site {path}: unknown key {key!r}; known keys: {', '.join(known)}")
            values[key] = _typed(known[key], raw, f"--site {path}: {key}")
    values |= {k: v for k, v in overrides.items() if v is not None}
    site = Site(**values)
    for name in ("cpus_per_proc", "gpus_per_proc", "throttle", "signal_seconds", "max_requeues"):
        low = 1 if name == "cpus_per_proc" else 0
        if getattr(site, name) < low:
            raise SweepError(f"--{name.replace('_', '-')} {getattr(site, name)} must be at least {low}")
    if site.setup and not Path(site.setup).is_file():
        raise SweepError(f"--setup {site.setup} does not exist; give the shell file tasks should source")
    try:
        shlex.split(site.sbatch)
    except ValueError as err:
        raise SweepError(f"--sbatch {site.sbatch!r} cannot be split into options ({err}); fix its quoting") from None
    return site


def _typed(f: dataclasses.Field, raw: str, where: str) -> Any:
    if f.type in ("int", int):
        try:
            return int(raw)
        except ValueError:
            raise SweepError(f"{where} = {raw!r} is not an integer; write a whole number") from None
    return raw.strip()


def array_spec(indices: Iterable[int], throttle: int = 0) -> str:
    """SLURM's --array value for these task indices: runs compressed to ranges, ``%K`` when throttled."""
    idx = sorted(set(indices))
    parts, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts) + (f"%{throttle}" if throttle else "")


def sbatch_commands(table: Path, results: Path, groups: dict[int, list[int]], site: Site,
                    job_name: str) -> list[tuple[list[str], dict[str, str]]]:
    """One (sbatch argv, extra env) per process count: an array over that group's row indices."""
    logs = results / "logs"
    env = {"GHOSTSYS_PYTHON": site.python or sys.executable, "GHOSTSYS_MODULES": site.modules,
           "GHOSTSYS_SETUP": str(Path(site.setup).absolute()) if site.setup else "",
           "GHOSTSYS_MAX_REQUEUES": str(site.max_requeues), "GHOSTSYS_LOG_DIR": str(logs)}
    out = []
    for nprocs, indices in sorted(groups.items()):
        cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--array={array_spec(indices, site.throttle)}",
               f"--output={logs}/%A_%a.out", "--open-mode=append", f"--chdir={Path.cwd()}", "--export=ALL",
               "--nodes=1", "--ntasks=1", f"--cpus-per-task={nprocs * site.cpus_per_proc}", "--requeue",
               f"--signal=B:USR1@{site.signal_seconds}"]
        if site.gpus_per_proc:
            cmd.append(f"--gres={site.gpu_gres}:{nprocs * site.gpus_per_proc}")
        for name in ("partition", "account", "qos", "time", "constraint"):
            if getattr(site, name):
                cmd.append(f"--{name}={getattr(site, name)}")
        cmd += shlex.split(site.sbatch)
        out.append((cmd + [str(ARRAY_SCRIPT), str(table.absolute()), str(results.absolute())], env))
    return out


def require(tool: str) -> str:
    """The path of a SLURM command, or a SweepError saying where to run instead."""
    path = shutil.which(tool)
    if path is None:
        raise SweepError(f"{tool} is not on PATH; run this on a SLURM login node (or install slurm-client)")
    return path


def submit(cmd: list[str], env: dict[str, str]) -> str:
    """Run one sbatch command; return the job id it printed."""
    proc = subprocess.run([require("sbatch"), *cmd[1:]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    if proc.returncode != 0:
        raise SweepError(f"sbatch refused the job: {proc.stderr.strip()[:500]}; fix the site options")
    return proc.stdout.strip().split(";")[0]
