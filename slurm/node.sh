#!/bin/bash
# One node of a multi-node run (slurm/multinode.sh starts one copy per node through srun): builds
# this node's launcher command from SLURM's variables and runs it with SIGUSR1 passed to its ranks.
#   node.sh accelerate|torchrun|deepspeed SCRIPT [ARGS...]
# Reads SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID, GHOSTSYS_MAIN_HOST, GHOSTSYS_MAIN_PORT, GHOSTSYS_HOSTS
# and GHOSTSYS_PROCS_PER_NODE (else SLURM_GPUS_ON_NODE, else 1). GHOSTSYS_DRY_RUN=1 prints the command.
set -uo pipefail
root=${GHOSTSYS_ROOT:?set by slurm/multinode.sh}
# shellcheck source=slurm/lib.sh
source "$root/slurm/lib.sh"
launcher=$1; shift
nnodes=${SLURM_NNODES:?} node=${SLURM_NODEID:?} job=${SLURM_JOB_ID:?}
host=${GHOSTSYS_MAIN_HOST:?} port=${GHOSTSYS_MAIN_PORT:?}
per_node=${GHOSTSYS_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
bin=${GHOSTSYS_PYTHON_BIN:+$GHOSTSYS_PYTHON_BIN/}

case $launcher in
    accelerate)   # Accelerate hands these to torch's elastic agent: c10d rendezvous at host:port
        cmd=("${bin}accelerate" launch --multi_gpu --num_machines "$nnodes" --machine_rank "$node"
             --num_processes $((nnodes * per_node)) --main_process_ip "$host" --main_process_port "$port"
             --rdzv_backend c10d --mixed_precision no --dynamo_backend no) ;;
    torchrun)
        cmd=("${bin}torchrun" --nnodes "$nnodes" --nproc_per_node "$per_node" --rdzv_backend c10d
             --rdzv_endpoint "$host:$port" --rdzv_id "$job") ;;
    deepspeed)    # no ssh/pdsh: every node starts its own ranks; the hostfile only counts slots per node
        hostfile=${TMPDIR:-/tmp}/ghostsys-hostfile-$job
        cmd=("${bin}deepspeed" --hostfile "$hostfile" --no_ssh --node_rank "$node"
             --master_addr "$host" --master_port "$port") ;;
    *)
        echo "node.sh: launcher $launcher is unknown; use accelerate, torchrun or deepspeed" >&2; exit 2 ;;
esac
cmd+=("$@")

if [[ -n ${GHOSTSYS_DRY_RUN:-} ]]; then
    echo "node $node: ${cmd[*]}"
    exit 0
fi
if [[ $launcher == deepspeed ]]; then
    for h in ${GHOSTSYS_HOSTS:?}; do echo "$h slots=$per_node"; done > "$hostfile"
    trap 'rm -f "$hostfile"' EXIT
fi
ghostsys_run "${cmd[@]}"
