# shellcheck shell=bash
# Runtime environment of every training process (sourced by launch/common.sh).
#
# Each value is a default: whatever the caller (an sbatch script's site block, a user's shell)
# already exported wins. Network-specific NCCL settings (interfaces, HCAs) are site choices and
# live in the sbatch scripts' site block, not here.

# Megatron-core issues a tensor-parallel collective and the GEMM that overlaps it on separate
# streams and relies on the GPU running them in issue order; with one hardware work queue per
# device they cannot be reordered (needed for TP communication overlap and sequence parallelism).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# A rank whose NCCL collective fails or times out tears its process down (3: without the
# communicator clean-up that can itself hang) instead of hanging until the wall-clock limit:
# torchrun then fails, srun --kill-on-bad-exit ends the step on every node, and the batch script
# requeues from the last checkpoint. 3 is torch's default since 2.2; set so older images agree.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
# On a collective timeout each rank dumps its flight-recorder trace of the last collectives,
# which is how a hang is traced to the rank that diverged (older torch releases read the size
# from TORCH_NCCL_TRACE_BUFFER_SIZE, which torch 2.13 still accepts but warns about).
export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# Free communication buffers when the collective finishes rather than when the caching allocator
# next syncs the stream (lower peak memory; what Megatron-LM's examples set).
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"

# InfiniBand: wait longer before declaring a lost packet fatal (4.096 us * 2^22 ~ 17 s per retry);
# large jobs otherwise die on transient fabric congestion.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"

# Let the caching allocator grow segments in place: variable-length batches otherwise fragment
# memory and a run that fits on paper fails with an out-of-memory error after hours.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
