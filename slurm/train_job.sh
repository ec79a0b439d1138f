# shellcheck shell=bash
# The body shared by the sbatch scripts in this folder; each sets the variables below and ends in
#   source "${REPO_DIR}/slurm/train_job.sh" "$@"
#
# What one run of a batch job does:
#  1. derive the rendezvous from the allocation: node 0 of SLURM_JOB_NODELIST hosts the store;
#  2. start one task per node with srun; each runs launch/train_multi_node.sh (torchrun, one
#     process per GPU), node rank = the task's SLURM_NODEID;
#  3. forward the pre-timeout signal (#SBATCH --signal=B:USR1@N reaches only this batch shell) to
#     the job step, where the trainer saves a checkpoint and exits 0;
#  4. when the step is over: done if the trainer wrote RUN_DIR/COMPLETED; otherwise, if the
#     trainer stopped cleanly (preempted, or exit 0 before the end), requeue the job (same job
#     id, same RUN_DIR) and the next run resumes from RUN_DIR's latest checkpoint. A failed step
#     (non-zero exit without a pre-timeout signal) is not requeued unless REQUEUE_ON_FAILURE=1:
#     a configuration error or a bug would otherwise loop. A step that ended because it could not
#     make progress (the trainer's watchdog or a lost rank, exit code 7: a stack dump in
#     RUN_DIR/hangs/ newer than this run's start) is requeued: the next run resumes from latest.
#
# Variables (set by the sbatch script; CAPS names may also come from the submitting environment):
#   REPO_DIR          the checkout (on a filesystem every node sees); jobs run from it
#   CONFIG            training config, relative to REPO_DIR
#   NPROC_PER_NODE    processes per node (GPUs per node; CPU processes in CPU mode)
#   TRAIN_OVERRIDES   array of dotted.key=value overrides (the script's own arguments follow)
#   RUN_DIR           checkpoint.dir: checkpoints, COMPLETED marker; one per job id
#   LOG_DIR           per-job logs: one file per node and run
#   MAX_REQUEUES      stop requeueing after this many restarts (SLURM_RESTART_COUNT)
#   REQUEUE_ON_FAILURE=1  also requeue after a failed step (transient hardware/network faults)
#   CONTAINER_IMAGE   pyxis/enroot image for srun (empty: the host environment)
#   CONTAINER_MOUNTS  pyxis mounts (with CONTAINER_IMAGE)
#   PYTHON_ENV        virtual environment put first on PATH when there is no container
#   DRY_RUN=1         print the torchrun command of every node and do not requeue (tests)

set -euo pipefail

job_log() { printf '[%s job %s] %s\n' "$(date +%FT%T)" "${SLURM_JOB_ID}" "$*"; }

: "${SLURM_JOB_ID:?submit with sbatch: this script needs a Slurm allocation}"
cd "${REPO_DIR}"
if [[ ! -f "${CONFIG}" ]]; then
    job_log "config '${CONFIG}' not found under ${REPO_DIR}: set CONFIG or submit from the checkout" >&2
    exit 2
fi
if [[ -z "${CONTAINER_IMAGE}" && -x "${PYTHON_ENV}/bin/python" ]]; then
    export PATH="${PYTHON_ENV}/bin:${PATH}"
fi

# ---- rendezvous -------------------------------------------------------------------------------
mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
export MASTER_ADDR="${HOSTS[0]}"
# Unless set: derived from the job id, so that two jobs sharing a node never pick the same port,
# and stable across requeues of the same job.
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export NNODES="${SLURM_NNODES}"
export NPROC_PER_NODE
export DRY_RUN="${DRY_RUN:-0}"

RESTART="${SLURM_RESTART_COUNT:-0}"
mkdir -p "${RUN_DIR}" "${LOG_DIR}"
# Marks this run's start: a stack dump in RUN_DIR/hangs newer than it means "no progress".
RUN_STARTED="${RUN_DIR}/.run_started_${SLURM_JOB_ID}_${RESTART}"
touch "${RUN_STARTED}"
job_log "run ${RESTART}: ${NNODES} node(s) x ${NPROC_PER_NODE} processes, store ${MASTER_ADDR}:${MASTER_PORT}"
job_log "config ${CONFIG}; checkpoints in ${RUN_DIR}; node logs in ${LOG_DIR}"

SRUN_ARGS=(
    --nodes="${SLURM_NNODES}"
    --ntasks-per-node=1                  # one torchrun per node; it starts the per-GPU processes
    # Slurm 22.05's srun does not inherit --cpus-per-task from the allocation (23.11 does again).
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
    --kill-on-bad-exit=1                 # one failed node ends the step on all nodes at once
    --output="${LOG_DIR}/%x-%j-run${RESTART}-node%n.log"
)
if [[ -n "${CONTAINER_IMAGE}" ]]; then
    SRUN_ARGS+=(--container-image="${CONTAINER_IMAGE}" --container-mounts="${CONTAINER_MOUNTS}"
                --container-workdir="${REPO_DIR}")
fi

# checkpoint.dir comes last so that it always is RUN_DIR, the folder checked for COMPLETED.
srun "${SRUN_ARGS[@]}" launch/train_multi_node.sh "${CONFIG}" \
    "${TRAIN_OVERRIDES[@]}" "$@" checkpoint.dir="${RUN_DIR}" &
SRUN_PID=$!

# ---- signals ----------------------------------------------------------------------------------
# USR1 (the pre-timeout warning) is forwarded to the step: srun passes it to every process of the
# step and the trainer saves and exits 0. TERM means Slurm is ending the job (scancel, time limit,
# preemption): forward it too (the trainer saves if it can) but do not requeue afterwards.
PREEMPTED=0
TERMINATED=0
forward_signal() {
    job_log "batch shell got SIG$1: forwarding it to the training step"
    kill -s "$1" "${SRUN_PID}" 2>/dev/null || true
}
trap 'PREEMPTED=1; forward_signal USR1' USR1
trap 'TERMINATED=1; forward_signal TERM' TERM

# `wait` returns early (status > 128) when a trapped signal arrives; wait again until srun has
# really exited, i.e. until every node has finished saving.
while :; do
    wait "${SRUN_PID}" && STEP_RC=0 || STEP_RC=$?
    kill -0 "${SRUN_PID}" 2>/dev/null || break
done
job_log "training step exited with status ${STEP_RC}"

# ---- complete, or requeue ---------------------------------------------------------------------
if [[ -f "${RUN_DIR}/COMPLETED" ]]; then
    job_log "training complete (${RUN_DIR}/COMPLETED)"
    exit 0
fi
if ((TERMINATED)); then
    job_log "terminated by Slurm (scancel, time limit or preemption): not requeueing"
    exit "${STEP_RC}"
fi
HUNG=0
if [[ -d "${RUN_DIR}/hangs" ]] && [[ -n "$(find "${RUN_DIR}/hangs" -type f -newer "${RUN_STARTED}" -print -quit)" ]]; then
    HUNG=1
    job_log "a rank could not make progress (stack dumps in ${RUN_DIR}/hangs): requeueing from the latest checkpoint"
fi
if ((STEP_RC != 0 && !PREEMPTED && !HUNG)) && [[ "${REQUEUE_ON_FAILURE:-0}" != 1 ]]; then
    job_log "training failed (status ${STEP_RC}; node logs in ${LOG_DIR}): not requeueing" \
        "(REQUEUE_ON_FAILURE=1 retries failures from the last checkpoint)"
    exit "${STEP_RC}"
fi
if ((RESTART >= MAX_REQUEUES)); then
    job_log "not complete after ${RESTART} requeue(s) (MAX_REQUEUES=${MAX_REQUEUES}): giving up"
    exit 1
fi
if [[ "${DRY_RUN}" == 1 ]]; then
    job_log "dry run: would requeue"
    exit 0
fi
job_log "not complete: requeueing; the next run resumes from the latest checkpoint in ${RUN_DIR}"
scontrol requeue "${SLURM_JOB_ID}"
