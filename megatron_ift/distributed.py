"""Process groups of a run: torch.distributed and megatron-core's parallel groups, ranks, seeds."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_ift.parallel import ParallelConfig
from megatron_ift.platform import Platform
from megatron_ift.seeding import step_seed


def rank() -> int:
    """This process's global rank (before the process group exists: torchrun's ``RANK``; 0
    for a single process)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def print_rank0(*args) -> None:
    """``print`` on global rank 0 only, flushed."""
    if rank() == 0:
        print(*args, flush=True)


def model_parallel_seed(seed: int, platform: Platform) -> None:
    """Seed torch and megatron-core's model-parallel RNG tracker (dropout streams per TP rank).

    On the CPU the tracker's "CUDA" states are the CPU generator's (:mod:`megatron_ift.cpu_compat`)
    and the tracker is rebuilt; call after ``parallel_state.initialize_model_parallel``.
    """
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=not platform.cuda)


def seed_step(seed: int, step: int, platform: Platform) -> None:
    """All randomness of optimizer step ``step`` derives from ``(seed, step)``
    (:func:`megatron_ift.seeding.step_seed`): a resumed run repeats the uninterrupted one."""
    model_parallel_seed(step_seed(seed, step), platform)


def init_distributed(cfg: ParallelConfig, platform: Platform) -> None:
    """Initialise torch.distributed (from torchrun's environment) and megatron-core's groups.

    A single process without torchrun's variables becomes a world of one. The backend is the
    platform's (NCCL on a GPU, gloo on the CPU) unless ``parallel.backend`` forces one.
    """
    backend = platform.backend if cfg.backend == "auto" else cfg.backend
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend=backend,
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
        )
    cfg.data_parallel_size(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        distributed_timeout_minutes=cfg.timeout_minutes,
        # As Megatron-LM by default: gloo twins of the data-parallel groups, for CPU objects
        # (e.g. distributed-optimizer state) next to NCCL on a GPU.
        create_gloo_process_groups=True,
    )


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the default process group (idempotent)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
