#!/usr/bin/env bash
# Train on several machines: run once per node (by hand, pdsh, or srun with one task per node).
#
#   launch/train_multi_node.sh CONFIG.yaml [dotted.key=value ...]
#
# Rendezvous, from the environment (the first form is what slurm/*.sbatch use):
#   static  MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK: node NODE_RANK holds global ranks
#           NODE_RANK*NPROC_PER_NODE ... +NPROC_PER_NODE-1; the store runs on MASTER_ADDR.
#   c10d    RDZV_ENDPOINT=host:port, NNODES (RDZV_ID, default SLURM_JOB_ID): node ranks are
#           assigned in arrival order; use where node ranks need not be fixed.
# Inside a Slurm step, NNODES and NODE_RANK default to SLURM_NNODES and the task's SLURM_NODEID.
# Other environment: NPROC_PER_NODE, TORCHRUN, TRAIN_MODULE, DRY_RUN (see launch/common.sh).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_require_config "$@"
CONFIG="$1"
shift

NNODES="${NNODES:-${SLURM_NNODES:?set NNODES (number of nodes)}}"
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    RDZV_ARGS=(--rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT}"
               --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:?set RDZV_ID (any string shared by all nodes)}}")
else
    # Read per task: a batch shell exports one SLURM_NODEID for all nodes, srun sets each task's.
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK (0 .. NNODES-1)}}"
    RDZV_ARGS=(--node-rank="${NODE_RANK}"
               --master-addr="${MASTER_ADDR:?set MASTER_ADDR (the host of node rank 0)}"
               --master-port="${MASTER_PORT:?set MASTER_PORT (a free port on MASTER_ADDR)}")
fi
launch_signal_setup

# --max-restarts=0: a failed node ends the step; recovery is a requeue that resumes from the
# latest checkpoint, which also replaces a broken node, unlike an in-place restart.
launch_exec "${TORCHRUN}" --nnodes="${NNODES}" --nproc-per-node="${NPROC_PER_NODE}" \
    "${RDZV_ARGS[@]}" --max-restarts=0 "${SIGNAL_ARGS[@]}" \
    -m "${TRAIN_MODULE}" --config "${CONFIG}" "$@"
