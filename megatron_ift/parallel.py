"""The parallel layout: validated sizes (process groups are built by :mod:`megatron_ift.distributed`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

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
    """Context parallelism: every row split along the sequence over this many ranks
    (megatron-core's load-balanced layout; ``data.seq_length`` a multiple of 2 x this). The
    local spec's attention all-gathers keys and values; the Transformer Engine spec uses TE's
    context-parallel attention."""
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
                f"world size {world_size} is not divisible by tensor x pipeline x context parallel = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size} = {mp}; change parallel.tensor_model_parallel_size / "
                "pipeline_model_parallel_size / context_parallel_size or the number of processes"
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
