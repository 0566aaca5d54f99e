"""Run directories: config, environment, append-only metrics, atomic summary (DESIGN §7).

The loader that turns any set of them into one pandas DataFrame is ``ghostsys.study.results``.

A run directory holds config.json, env.json, metrics.jsonl (append-only, one JSON object per
line, each with the global "step" it was logged at), summary.json (written last, atomically: its
presence means the run finished) and checkpoints/.

Durability: every metrics line is written with one write() and flushed to the OS at once, so a
killed process (SIGKILL, SLURM preemption) loses nothing already logged. os.fsync, which only
matters if the node itself dies, is paid at most every FSYNC_INTERVAL_S seconds: on the network
file systems of clusters one fsync can take tens of milliseconds, too dear for every step.
summary.json, config.json, env.json and truncations are always fsync'd.

Permissions: every file gets the mode a plain open() would give under the user's umask (0644
under the usual 022), atomic writes included, so a colleague's `collect` or notebook on a shared
cluster reads what the umask lets them read.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

FSYNC_INTERVAL_S = 5.0
RUN_FILES = ("config.json", "summary.json", "metrics.jsonl")  # any of them marks a run directory


def _default(obj: Any) -> Any:
    # numpy / torch scalars, paths, tuples-in-sets: keep summaries writable whatever the caller passes.
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def _dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(obj, default=_default, **kw)


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """This process's umask, read without changing it (os.umask can only be read by setting it)."""
    try:  # Linux >= 4.7: no window in which another thread would create files under a wrong mask
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere: set and restore. A thread of this process creating a file in that instant would get
    # mode & ~077; the lock at least keeps two readers from restoring each other's temporary mask.
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def _mkstemp_shared(path: Path, prefix: str) -> tuple[int, str]:
    """mkstemp in `path`'s directory, then the mode a plain open() would give (mkstemp always makes 0600).

    Colleagues on a shared cluster read results through their group/other bits: the replaced file
    must carry what the user's umask allows, like metrics.jsonl does, not mkstemp's private mode.
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to `path` so readers see the old file or the complete new one, never a torn one.

    The file gets the mode the umask gives a new file (0644 under the usual 022), not mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp = _mkstemp_shared(path, f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic within one directory (POSIX rename)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:  # makes the rename itself durable; not possible on every platform / file system
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parsed lines; a torn last line (a process killed mid-write) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class RunDir:
    """One run's directory: config, environment, append-only metrics, atomic summary, checkpoints."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._last_fsync = float("-inf")  # the first line is always fsync'd
        self.lines_written = 0  # metrics lines this object appended (0: no step of this invocation finished)

    config_path = property(lambda self: self.path / "config.json")
    env_path = property(lambda self: self.path / "env.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")

    @property
    def checkpoint_dir(self) -> Path:
        """`<run>/checkpoints`, created on first use."""
        d = self.path / "checkpoints"
        d.mkdir(exist_ok=True)
        return d

    @property
    def complete(self) -> bool:
        """True once summary.json exists (it is written last)."""
        return self.summary_path.exists()

    def write_config(self, config: dict[str, Any]) -> None:
        """Write the resolved config to config.json (atomically)."""
        write_json_atomic(self.config_path, config)

    def write_env(self, env: dict[str, Any]) -> None:
        """Write the environment record to env.json (atomically)."""
        write_json_atomic(self.env_path, env)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json atomically (temp file in this directory + os.replace)."""
        write_json_atomic(self.summary_path, summary)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one metrics line (must carry the global 'step'); flushed now, fsync'd at most every few seconds."""
        if "step" not in record:
            raise ValueError("a metrics record needs a 'step' key (the global step) so a resumed run can truncate")
        line = _dumps(record, allow_nan=True) + "\n"
        with open(self.metrics_path, "a") as f:
            f.write(line)
            f.flush()
            now = time.monotonic()
            if now - self._last_fsync >= FSYNC_INTERVAL_S:
                os.fsync(f.fileno())
                self._last_fsync = now
        self.lines_written += 1

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metrics lines as dicts (a torn last line is skipped)."""
        return read_jsonl(self.metrics_path)

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json, or None for an unfinished run."""
        return json.loads(self.summary_path.read_text()) if self.complete else None

    def truncate_metrics_after(self, step: int) -> int:
        """Drop metrics lines with step > `step` (a resume from the checkpoint at `step`); returns lines kept."""
        kept = [r for r in self.read_metrics() if r.get("step", -1) <= step]
        fd, tmp = _mkstemp_shared(self.metrics_path, ".metrics.")
        with os.fdopen(fd, "w") as f:
            f.writelines(_dumps(r, allow_nan=True) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)
        _fsync_dir(self.path)
        return len(kept)


class NewPaths:
    """What exists at and under `path` now, so that whatever one invocation adds can be taken away again.

    A run that fails before its first step must leave nothing behind, but the directory may hold a
    previous run's results (a resume) or sit in a folder other runs share: only paths that did not
    exist when this was made are removed, folders only while empty (never another run's files).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.missing: list[Path] = []  # path and the ancestors that do not exist yet, deepest first
        for p in (self.path, *self.path.parents):
            if p.exists():
                break
            self.missing.append(p)
        self.before = set(self.path.rglob("*")) if self.path.is_dir() else set()

    def remove(self) -> None:
        """Delete every file and (empty) folder added since; then the folders on the way that were made."""
        added = set(self.path.rglob("*")) - self.before if self.path.is_dir() else set()
        for p in sorted(added, key=lambda p: len(p.parts), reverse=True):  # contents before their folder
            try:
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass  # something else lives there now: leave it
        for d in self.missing:
            try:
                d.rmdir()
            except OSError:
                break


# --- environment -------------------------------------------------------------------------------


def _version(dist_name: str) -> str | None:
    # Read from package metadata: importing deepspeed costs ~5 s on CPU (measured), torchvision ~3 s.
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(repo: Path) -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        rev = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_rev": None, "git_dirty": None}
    return {"git_rev": rev, "git_dirty": dirty}


def environment() -> dict[str, Any]:
    """Versions, platform, CPU, device and git revision of this process, as one JSON-able dict."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: v for name in ("torchvision", "accelerate", "deepspeed", "numpy", "pandas") if (v := _version(name))},
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "hostname": socket.gethostname(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "executable": sys.executable,
    }
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, device_name=torch.cuda.get_device_name(0),
                   device_count=torch.cuda.device_count())
    else:
        env["device_name"] = "cpu"
    return env | _git(Path(__file__).resolve().parent.parent)
