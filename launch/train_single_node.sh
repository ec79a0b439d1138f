#!/usr/bin/env bash
# Train on one machine: one process per GPU (or NPROC_PER_NODE CPU processes with gloo).
#
#   launch/train_single_node.sh CONFIG.yaml [dotted.key=value ...]
#   NPROC_PER_NODE=2 launch/train_single_node.sh configs/demo.yaml train.steps=20   # CPU demo
#
# Environment: NPROC_PER_NODE, TORCHRUN, TRAIN_MODULE, DRY_RUN (see launch/common.sh).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_require_config "$@"
CONFIG="$1"
shift
launch_signal_setup

# --standalone: a private c10d store on a free local port, so concurrent runs cannot collide.
# --max-restarts=0: restarts resume from a checkpoint (Slurm requeue), never in place.
launch_exec "${TORCHRUN}" --standalone --nnodes=1 --nproc-per-node="${NPROC_PER_NODE}" \
    --max-restarts=0 "${SIGNAL_ARGS[@]}" \
    -m "${TRAIN_MODULE}" --config "${CONFIG}" "$@"
