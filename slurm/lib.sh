# Shared by slurm/array.sh, slurm/multinode.sh and slurm/node.sh: sourced, never run.
#
# How a stop request travels: SLURM signals the batch shell (--signal=B:USR1@N before the time
# limit, or `scancel --signal=USR1 --batch` by hand). Launchers (torchrun, accelerate launch,
# deepspeed) do not forward USR1, and torchrun starts its workers in sessions of their own, so the
# shell sends USR1 to every process below the run itself. The run is started with USR1 ignored:
# the launchers inherit that and ignore it, each rank installs its own handler (ghostsys.run.preempt)
# that only sets a flag; at the next step boundary the ranks agree (one all-reduce) and all stop at
# the same step, after a checkpoint. A rank still starting up has no handler yet and ignores the
# signal, so the request is repeated every GHOSTSYS_RESEND_S seconds until the run exits.

GHOSTSYS_STOP=0                              # 1 once this shell got SIGUSR1
GHOSTSYS_CHILD=
GHOSTSYS_RESEND_S=${GHOSTSYS_RESEND_S:-5}
GHOSTSYS_EXIT_PREEMPTED=75                   # what a stopped launch/run.py exits with (ghostsys.run.preempt)

# Every process below pid $1, breadth first (read from /proc: no procps needed on the node).
ghostsys_descendants() {
    local -A kids=()
    local f pid key val p c
    for f in /proc/[0-9]*/status; do
        pid=${f#/proc/}; pid=${pid%/status}
        while read -r key val; do
            if [[ $key == PPid: ]]; then kids[$val]+=" $pid"; break; fi
        done 2>/dev/null < "$f"
    done
    local queue=("$1")
    while ((${#queue[@]})); do
        p=${queue[0]}; queue=("${queue[@]:1}")
        for c in ${kids[$p]:-}; do echo "$c"; queue+=("$c"); done
    done
}

# SIGUSR1 to pid $1 and everything below it (launchers ignore it, ranks set their stop flag).
ghostsys_forward() {
    local p
    for p in "$1" $(ghostsys_descendants "$1"); do kill -USR1 "$p" 2>/dev/null || true; done
}

_ghostsys_on_usr1() {
    GHOSTSYS_STOP=1
    echo "ghostsys: SIGUSR1 at $(date +%T): asking the run to checkpoint at its next step and stop" >&2
    [[ -n $GHOSTSYS_CHILD ]] && ghostsys_forward "$GHOSTSYS_CHILD"
}

# Run "$@" in the background with SIGUSR1 passed on as above; return its exit status.
ghostsys_run() {
    trap _ghostsys_on_usr1 USR1
    ( trap '' USR1; exec "$@" ) &
    GHOSTSYS_CHILD=$!
    local sleeper
    while kill -0 "$GHOSTSYS_CHILD" 2>/dev/null; do
        if ((GHOSTSYS_STOP)); then
            sleep "$GHOSTSYS_RESEND_S" & sleeper=$!
            wait -n 2>/dev/null         # the run's exit or the pause, whichever comes first
            kill "$sleeper" 2>/dev/null
            kill -0 "$GHOSTSYS_CHILD" 2>/dev/null && ghostsys_forward "$GHOSTSYS_CHILD"
        else
            wait "$GHOSTSYS_CHILD"      # returns at the run's exit, or early when USR1 arrives
        fi
    done
    wait "$GHOSTSYS_CHILD"              # its exit status (bash keeps it after the reap)
}

# After the run exited with status $1: if a stop was requested and the run did not finish, requeue
# THIS array task (or this job) -- only the batch shell calls this, so only one process requeues --
# unless it was already requeued GHOSTSYS_MAX_REQUEUES times. SLURM ends the task at the requeue; the
# requeued task runs the same command, which resumes from the checkpoint. Returns when not requeueing.
ghostsys_requeue_if_stopped() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0} cap=${GHOSTSYS_MAX_REQUEUES:-3} id
    ((GHOSTSYS_STOP)) && ((rc != 0)) || return 0
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; else id=$SLURM_JOB_ID; fi
    if ((restarts >= cap)); then
        echo "ghostsys: stopped (exit $rc) after $restarts requeues, the cap (GHOSTSYS_MAX_REQUEUES=$cap): not requeueing; submit again to resume" >&2
        return 0
    fi
    echo "ghostsys: stopped (exit $rc); requeueing $id (requeue $((restarts + 1)) of at most $cap)" >&2
    if scontrol requeue "$id"; then
        sleep 60 & wait $!              # SLURM ends this task now; do not race it with an exit status
    else
        echo "ghostsys: scontrol requeue $id failed; submit again to resume" >&2
    fi
}

# The site's environment, from launch/sweep.py submit's --modules and --setup (or the same env vars).
ghostsys_site_setup() {
    if [[ -n ${GHOSTSYS_MODULES:-} ]]; then
        # shellcheck disable=SC2086
        module load $GHOSTSYS_MODULES || { echo "ghostsys: module load $GHOSTSYS_MODULES failed" >&2; exit 2; }
    fi
    if [[ -n ${GHOSTSYS_SETUP:-} ]]; then
        # shellcheck disable=SC1090
        source "$GHOSTSYS_SETUP" || { echo "ghostsys: source $GHOSTSYS_SETUP failed" >&2; exit 2; }
    fi
}
