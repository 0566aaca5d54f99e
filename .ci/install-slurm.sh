#!/usr/bin/env bash
# Install Debian's Slurm (controller, node daemon, client commands) for the real-Slurm tests.
# Idempotent; as root (CI) or with passwordless sudo. The tests start their own one-node cluster
# from these binaries (tests/_slurm.py): no service is configured or started here.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have slurmctld && have slurmd && have sbatch && have scontrol; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n env DEBIAN_FRONTEND=noninteractive)  # sudo drops the environment
else
    echo "cannot install Slurm: not root and no passwordless sudo" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install Slurm: no apt-get (the tests use Debian's slurmctld, slurmd and slurm-client)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
pkgs=(slurmctld slurmd slurm-client)
apt=("${sudo[@]}" apt-get -q -o DPkg::Lock::Timeout=300)  # wait for another apt/dpkg instead of failing
# The package lists of a fresh machine may be empty or stale: update only when the install needs it.
"${apt[@]}" install -y --no-install-recommends "${pkgs[@]}" \
    || { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}"; }
