"""Shared set-up for spawned test workers: CPU compat, process groups, a tiny model."""

from __future__ import annotations

import json
import os

from megatron_ift import cpu_compat

cpu_compat.enable()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_ift.models.config import ModelConfig  # noqa: E402
from megatron_ift.parallel import ParallelConfig, init_distributed  # noqa: E402


def tiny_model(**overrides) -> ModelConfig:
    kw = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, vocab_size=60, make_vocab_size_divisible_by=16,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def setup(tp=1, pp=1, vpp=None, sp=False, seed=1234, **kw) -> ParallelConfig:
    par = ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp, **kw,
    )
    init_distributed(par)
    cpu_compat.model_parallel_seed(seed)
    return par


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def dump(path: str, obj) -> None:
    if rank() == 0:
        with open(path, "w") as f:
            json.dump(obj, f)
