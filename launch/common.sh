# shellcheck shell=bash
# Shared by launch/train_single_node.sh and launch/train_multi_node.sh (sourced, not run).
#
# Environment understood by both launchers:
#   NPROC_PER_NODE  processes per node (default: the number of GPUs, or 1 without nvidia-smi)
#   TORCHRUN        the torchrun executable (default: torchrun on PATH)
#   TRAIN_MODULE    the Python module torchrun starts (default: megatron_ift.train; the tests
#                   substitute a stand-in that obeys the same contract)
#   TORCHRUN_SHUTDOWN_TIMEOUT  seconds torchrun waits for workers to save after a forwarded
#                   signal, outside Slurm (default 600)
#   DRY_RUN=1       print the torchrun command (one shell-quoted line) instead of running it

_launch_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/env.sh
source "${_launch_dir}/env.sh"

TORCHRUN="${TORCHRUN:-torchrun}"
TRAIN_MODULE="${TRAIN_MODULE:-megatron_ift.train}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC_PER_NODE="$(nvidia-smi --list-gpus | wc -l)"
    else
        NPROC_PER_NODE=1
    fi
fi

# Usage check shared by both launchers: the first argument is the config file.
launch_require_config() {
    if [[ $# -lt 1 || "$1" == -* ]]; then
        echo "usage: $(basename "$0") CONFIG.yaml [dotted.key=value ...]" >&2
        exit 2
    fi
    if [[ ! -f "$1" ]]; then
        echo "$(basename "$0"): config file '$1' not found (relative paths start at $(pwd))" >&2
        exit 2
    fi
}

# Signal handling differs inside and outside a Slurm job step, for one reason: SIGUSR1 is the
# trainer's "save a checkpoint and exit 0" request.
#  - Inside a step, Slurm delivers a step signal (srun forwarding, scancel --signal) to *every*
#    process of the step, so the workers already receive it. torchrun must then ignore it: by
#    default USR1 would kill torchrun and orphan its workers mid-save, and had torchrun handled it
#    (--signals-to-handle) it would forward a second copy and exit 1 after its workers saved,
#    which srun --kill-on-bad-exit turns into a SIGKILL for nodes still finishing their save.
#    SIG_IGN survives exec; the trainer installs its own handler, so only torchrun ignores it.
#  - Outside Slurm, a USR1 (or TERM) sent to torchrun must reach the workers: torchrun forwards
#    the signals named here to them, waits up to TORCHRUN_SHUTDOWN_TIMEOUT seconds for the save,
#    then kills them.
# Sets SIGNAL_ARGS (extra torchrun arguments) and, in a step, the trap in the calling shell.
launch_signal_setup() {
    SIGNAL_ARGS=()
    if [[ -n "${SLURM_STEP_ID:-}" ]]; then
        trap '' USR1
    else
        SIGNAL_ARGS=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
                     --shutdown-timeout="${TORCHRUN_SHUTDOWN_TIMEOUT:-600}")
    fi
}

# Replace this shell with the command, or print it (DRY_RUN=1) so tests and users can see the
# exact rendezvous, ranks and overrides a launch would use.
launch_exec() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    exec "$@"
}
