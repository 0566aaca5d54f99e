"""A real one-node Slurm cluster on localhost for the tests: Debian's slurmctld + slurmd, no systemd.

``LocalSlurm(dir).start()`` writes ``slurm.conf`` into `dir` (free ports, auth/none, cred/none,
select/cons_tres with CR_Core, this machine's cores), starts ``slurmctld -D -i`` and
``slurmd -D -N localhost`` as child processes and waits until the node is idle (~1-2 s);
``env`` holds the SLURM_CONF that every Slurm command must see; ``stop()`` cancels what is left and
ends both daemons by their PIDs. ``ensure_installed()`` installs the packages where it can
(root or passwordless sudo, through ``.ci/install-slurm.sh``) and otherwise says why not.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


def _find(tool: str) -> str | None:
    return shutil.which(tool) or next((f"{d}/{tool}" for d in SBIN if os.access(f"{d}/{tool}", os.X_OK)), None)


def ensure_installed() -> str | None:
    """None when Slurm's daemons and commands are here (installing them if this user can); else why not."""
    if all(_find(t) for t in DAEMONS + CLIENTS):
        return None
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "install-slurm.sh")], capture_output=True, text=True,
                          timeout=900)
    missing = [t for t in DAEMONS + CLIENTS if not _find(t)]
    if missing:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"Slurm cannot be installed here ({', '.join(missing)} missing): {' | '.join(why)}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This machine's CPU layout as slurmd itself reports it (a node claiming more is drained)."""
    out = subprocess.run([_find("slurmd"), "-C"], capture_output=True, text=True, timeout=60).stdout
    first = out.splitlines()[0].split()
    keep = ("CPUs=", "Boards=", "SocketsPerBoard=", "CoresPerSocket=", "ThreadsPerCore=")
    return "NodeName=localhost " + " ".join(w for w in first if w.startswith(keep)) + " State=UNKNOWN"


CONF = """\
ClusterName=ghostsys-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SrunPortRange={srun_lo}-{srun_hi}
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire + 5 s before it may start again (default 120 s); 5 is the least.
AuthInfo=cred_expire=5
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
PlugStackConfig={dir}/plugstack.conf
# linuxproc tracks a job's processes by parentage, so torchrun's workers (sessions of their own) are
# killed with the job; pgid would lose them, cgroup needs a cgroup setup this machine may not have.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MailProg=/bin/true
KillWait=10
{node}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """A one-node cluster whose state, logs and config live in `dir`."""

    def __init__(self, dir: Path) -> None:
        self.dir = Path(dir)
        self.conf = self.dir / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = 60) -> "LocalSlurm":
        """Write the config, start both daemons, wait until the node is idle; raise with their logs if not."""
        (self.dir / "state").mkdir(parents=True, exist_ok=True)
        (self.dir / "spool").mkdir(exist_ok=True)
        (self.dir / "plugstack.conf").write_text("")  # not the system's /etc/slurm/plugstack.conf
        lo = _free_port()
        self.conf.write_text(CONF.format(ctld_port=_free_port(), d_port=_free_port(), srun_lo=lo, srun_hi=lo + 20,
                                         user=getpass.getuser(), dir=self.dir, node=_node_line()))
        env = {**os.environ, **self.env}
        for name, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D", "-N", "localhost"])):
            out = open(self.dir / f"{name}.out", "w")
            self.procs[name] = subprocess.Popen([_find(name), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return self
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            time.sleep(0.1)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"the local Slurm node did not become idle (state {state!r}):\n{logs}")

    def run(self, tool: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster."""
        proc = subprocess.run([_find(tool), *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def queued(self) -> set[str]:
        """Every unfinished job's ids: its own, its array's (%F: the id sbatch printed) and task form (2_1)."""
        out = self.run("squeue", "-h", "-o", "%A %F %i").stdout
        return {tok for line in out.splitlines() for tok in line.split()}

    def logs(self, tail: int = 4000) -> str:
        """The tails of both daemons' logs, for a failure message."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            f = self.dir / name
            if f.exists():
                parts.append(f"--- {name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job left, then end both daemons by their PIDs (TERM, then KILL after 15 s)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "-u", getpass.getuser(), check=False, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.queued_safe():
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(15)

    def queued_safe(self) -> set[str]:
        """queued(), or nothing when the controller no longer answers."""
        try:
            return self.queued()
        except (RuntimeError, subprocess.TimeoutExpired):
            return set()
