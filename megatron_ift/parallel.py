"""Parallel layout: validated sizes, process-group set-up and tear-down (megatron-core groups)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from megatron_ift.config_io import check_literals
from megatron_ift.validation import ConfigError, check_positive_int


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How a model is split over processes. Data parallelism takes the rest of the world."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree (splits heads, MLP and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage (interleaved 1F1B); None for plain 1F1B."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in norm/dropout regions (needs TP > 1)."""
    context_parallel_size: int = 1
    """Context parallelism (not yet supported by the IFT step: must be 1)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with backward."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: nccl on GPU, gloo on CPU (auto), or forced."""
    timeout_minutes: int = 30
    """Collective timeout."""

    def __post_init__(self) -> None:
        check_positive_int("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size)
        check_positive_int("parallel.pipeline_model_parallel_size",
                           self.pipeline_model_parallel_size)
        check_positive_int("parallel.context_parallel_size", self.context_parallel_size)
        check_positive_int("parallel.timeout_minutes", self.timeout_minutes)
        if self.virtual_pipeline_model_parallel_size is not None:
            check_positive_int("parallel.virtual_pipeline_model_parallel_size",
                               self.virtual_pipeline_model_parallel_size)
            if self.pipeline_model_parallel_size < 2:
                raise ConfigError(
                    "parallel.virtual_pipeline_model_parallel_size needs "
                    "parallel.pipeline_model_parallel_size >= 2"
                )
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ConfigError("parallel.sequence_parallel=true needs tensor_model_parallel_size >= 2")
        if self.context_parallel_size != 1:
            raise ConfigError(
                "parallel.context_parallel_size > 1 is not supported by the IFT step yet; "
                "set it to 1 (use sequence_parallel for long sequences)"
            )
        check_literals(self, "parallel")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    def data_parallel_size(self, world_size: int) -> int:
        """DP degree for ``world_size`` processes; raises if the layout does not divide it."""
        mp = self.model_parallel_size * self.context_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor x pipeline parallel = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} = {mp}; "
                "change parallel.tensor_model_parallel_size / pipeline_model_parallel_size or "
                "the number of processes"
            )
        return world_size // mp

    def check_model(self, num_layers: int, num_attention_heads: int, num_query_groups: int) -> None:
        """Raise if the model cannot be split this way (before anything is built)."""
        tp, pp, vpp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.vpp
        if num_attention_heads % tp or num_query_groups % tp:
            raise ConfigError(
                f"tensor_model_parallel_size={tp} must divide the attention heads "
                f"({num_attention_heads}) and key/value groups ({num_query_groups})"
            )
        if num_layers % (pp * vpp):
            raise ConfigError(
                f"{num_layers} layers cannot be split into pipeline_model_parallel_size={pp} x "
                f"virtual_pipeline_model_parallel_size={vpp} = {pp * vpp} equal chunks"
            )


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def use_cpu_compat_without_cuda() -> None:
    """Without CUDA, run megatron-core through :mod:`megatron_ift.cpu_compat` (call it before
    megatron-core is imported: it imports it with eager fusions). Does nothing with CUDA.

    ``MEGATRON_IFT_EMULATE_CUDA=1`` (or ``report``) switches the emulated CUDA device on instead
    (:mod:`megatron_ift.emulated_cuda`): the GPU code path with CPU arithmetic.
    """
    from megatron_ift import emulated_cuda

    if emulated_cuda.requested():
        emulated_cuda.enable()
        return
    if not torch.cuda.is_available():
        from megatron_ift import cpu_compat

        cpu_compat.enable()


def model_parallel_seed(seed: int) -> None:
    """Seed megatron-core's model-parallel RNG streams: its CUDA tracker, or the CPU stand-in."""
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from megatron_ift import cpu_compat

        cpu_compat.model_parallel_seed(seed)


def init_distributed(cfg: ParallelConfig) -> None:
    """Initialise torch.distributed (from torchrun's environment) and megatron-core's groups.

    A single process without torchrun's variables becomes a world of one.
    """
    from megatron.core import parallel_state

    backend = default_backend() if cfg.backend == "auto" else cfg.backend
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
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
    """Tear down megatron-core's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
