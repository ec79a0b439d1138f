"""Model-only checkpoints with megatron-core dist_checkpointing: load at any TP/PP/VPP layout.

The sharded state dict is ``{"model": chunk.sharded_state_dict()}`` for one chunk, or
``{"model0": ..., "model1": ...}`` with virtual pipelining. dist_checkpointing keys are global
(layer numbers include the stage offset), so a checkpoint saved at one layout loads at another.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ift.checkpoint.layout import CheckpointError

LOAD_ERRORS = (Exception, CheckpointException)
"""What a dist_checkpointing load can raise for a damaged or foreign folder (torch's
``CheckpointException`` derives from ``BaseException``, so it is named explicitly)."""


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / Float16Module wrappers (we never save ``module.`` prefixes)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def apply_model_state(chunks: Sequence[torch.nn.Module], loaded: dict[str, Any], strict: bool = True) -> None:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=strict)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"], strict=strict)


def save_model(chunks: Sequence[torch.nn.Module], ckpt_dir: str) -> None:
    """Collectively save the model chunks of every rank into ``ckpt_dir``."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), ckpt_dir)


def load_model(chunks: Sequence[torch.nn.Module], ckpt_dir: str, strict: bool = True) -> None:
    """Collectively load ``ckpt_dir`` into this rank's chunks, whatever layout saved it."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    try:
        loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), ckpt_dir)
    except LOAD_ERRORS as exc:  # dist_checkpointing raises many types; name the folder and cause
        text = " ".join(str(exc).split())
        raise CheckpointError(
            f"could not load the model from {ckpt_dir} ({type(exc).__name__}: "
            f"{text[:300] + '...' if len(text) > 300 else text}): the folder is damaged or holds "
            "a different architecture (compare model.* with the 'model' entry of its "
            "megatron_ift.json)"
        ) from exc
    apply_model_state(chunks, loaded, strict=strict)
