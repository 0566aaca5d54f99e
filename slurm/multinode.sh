#!/bin/bash
# One run across several nodes: srun starts one launcher per node, and they meet at the first node.
#
#   sbatch --nodes=2 --gpus-per-node=4 slurm/multinode.sh LAUNCHER SCRIPT [ARGS...]
#   sbatch --nodes=2 --gpus-per-node=4 --time=04:00:00 --partition=gpu \
#          slurm/multinode.sh torchrun launch/run.py --mode syncbn --nprocs 8 --out runs/syncbn-8
#
# What a user sets (sbatch flags, never edits here): --nodes, the GPUs per node, --time, --partition,
# --account; LAUNCHER (accelerate | torchrun | deepspeed) and the run's own flags. Environment knobs:
# GHOSTSYS_PROCS_PER_NODE (default: the GPUs SLURM gave each node, else 1), GHOSTSYS_MAIN_PORT
# (default 20000 + job id mod 20000), GHOSTSYS_MODULES / GHOSTSYS_SETUP (modules to load, a file to
# source), GHOSTSYS_PYTHON_BIN (a venv's bin/ holding the launchers). The per-node commands are in
# slurm/node.sh; GHOSTSYS_DRY_RUN=1 prints them for every node instead of running them.
# Preemption: as slurm/array.sh, SIGUSR1 reaches every rank through srun, the run checkpoints, and
# this job requeues itself (at most GHOSTSYS_MAX_REQUEUES times); the same --out resumes.
#SBATCH --job-name=ghostsys-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -uo pipefail

[[ $# -ge 2 ]] || { echo "usage: sbatch --nodes=N slurm/multinode.sh accelerate|torchrun|deepspeed SCRIPT [ARGS...]" >&2; exit 2; }
root=${GHOSTSYS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
source "$root/slurm/lib.sh" || { echo "ghostsys: no $root/slurm/lib.sh; set GHOSTSYS_ROOT to the checkout" >&2; exit 2; }
ghostsys_site_setup

hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?run this under sbatch}") || exit 2
GHOSTSYS_HOSTS=$(echo $hosts)                                   # one line, space-separated
export GHOSTSYS_HOSTS
export GHOSTSYS_MAIN_HOST=${GHOSTSYS_MAIN_HOST:-${GHOSTSYS_HOSTS%% *}}   # the first host of the node list
export GHOSTSYS_MAIN_PORT=${GHOSTSYS_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export GHOSTSYS_ROOT=$root

if [[ -n ${GHOSTSYS_DRY_RUN:-} ]]; then                         # what srun would start on each node
    for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node bash "$root/slurm/node.sh" "$@"; done
    exit 0
fi
echo "ghostsys: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $GHOSTSYS_HOSTS, rendezvous $GHOSTSYS_MAIN_HOST:$GHOSTSYS_MAIN_PORT"
ghostsys_run srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash "$root/slurm/node.sh" "$@"
rc=$?
ghostsys_requeue_if_stopped "$rc"
exit "$rc"
