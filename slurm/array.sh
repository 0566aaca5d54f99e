#!/bin/bash
# One SLURM array task = one row of a sweep table: task i runs row i through the row's launcher.
#
#   launch/sweep.py submit TABLE --time 04:00:00 ...    # what users type (site options, grouping, logs)
#   sbatch --array=0-5%2 slurm/array.sh TABLE [RESULTS]  # the same by hand, from the repository root
#
# Row i's results go to RESULTS/<row_id>/ (default runs/sweeps/<table name>/), never to a directory
# named after the job, so reruns and requeues continue the same run. SIGUSR1 before the time limit
# (or a preemption) makes the run checkpoint at its next step and stop; the task then requeues
# itself, at most GHOSTSYS_MAX_REQUEUES times, and resumes from that checkpoint (slurm/lib.sh).
#SBATCH --job-name=ghostsys-sweep
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --nodes=1
#SBATCH --ntasks=1
set -uo pipefail

table=${1:?usage: sbatch --array=INDICES slurm/array.sh TABLE [RESULTS]}
results=${2:-}
task=${SLURM_ARRAY_TASK_ID:?run this as a SLURM array task: sbatch --array=INDICES slurm/array.sh TABLE}
# SLURM runs a copy of this script from its spool directory: find the checkout by name, not by $0.
root=${GHOSTSYS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/lib.sh
source "$root/slurm/lib.sh" || { echo "ghostsys: no $root/slurm/lib.sh; set GHOSTSYS_ROOT to the checkout" >&2; exit 2; }
ghostsys_site_setup
python=${GHOSTSYS_PYTHON:-python3}
[[ -n ${GHOSTSYS_LOG_DIR:-} ]] && export GHOSTSYS_LOG=$GHOSTSYS_LOG_DIR/${SLURM_ARRAY_JOB_ID}_${task}.out

echo "ghostsys: task ${SLURM_ARRAY_JOB_ID}_${task} (job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0}) on $(hostname) at $(date '+%F %T')"
ghostsys_run "$python" "$root/launch/sweep.py" run "$table" --row "$task" ${results:+--results "$results"}
rc=$?
ghostsys_requeue_if_stopped "$rc"
echo "ghostsys: task ${SLURM_ARRAY_JOB_ID}_${task} exits $rc at $(date '+%F %T')"
exit "$rc"
