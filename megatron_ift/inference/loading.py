"""Load a checkpoint for generation: this rank's model chunk and the checkpoint's tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import torch

from megatron_ift.checkpoint import layout
from megatron_ift.checkpoint.architecture import recorded_model
from megatron_ift.checkpoint.layout import CheckpointError
from megatron_ift.checkpoint.model_io import load_model
from megatron_ift.convert.export_hf import tokenizer_candidates
from megatron_ift.models.config import ModelConfig
from megatron_ift.models.gpt import build_gpt_chunks, transformer_config
from megatron_ift.parallel import ParallelConfig
from megatron_ift.platform import Platform


def model_config_of(ckpt_dir: str, recorded: dict[str, Any]) -> ModelConfig:
    """The recorded ModelConfig, dropout off (generation); a key this version does not know is
    refused by name (one path from a dict to a ModelConfig: :meth:`ModelConfig.from_dict`)."""
    cfg = ModelConfig.from_dict(recorded, source=f"{ckpt_dir}/{layout.METADATA}")
    return dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)


def load_for_inference(path: str, parallel: Optional[ParallelConfig], platform: Platform,
                       ) -> tuple[torch.nn.Module, ModelConfig, str]:
    """Build this rank's model chunk and load ``path`` into it, in evaluation mode.

    Needs megatron-core's process groups for ``parallel``
    (:func:`megatron_ift.distributed.init_distributed`); collective over all ranks.

    Args:
        path: a run directory (its ``latest`` checkpoint), an ``iter_*`` folder, or an
            imported checkpoint (``megatron-ift convert import-hf`` output).
        parallel: the layout (TP/PP; no virtual pipeline); None: one process.
        platform: the compute device and kernels.

    Returns:
        (model chunk, its ModelConfig, the checkpoint folder).

    Raises:
        CheckpointError: no checkpoint there, or no recorded architecture.
    """
    parallel = parallel or ParallelConfig()
    if parallel.vpp > 1:
        raise CheckpointError("generation does not use virtual pipeline stages; load with "
                              "virtual_pipeline_model_parallel_size unset")
    ckpt, recorded = recorded_model(path)
    cfg = model_config_of(ckpt, recorded)
    # the strict load below overwrites every parameter, so random initialisation (of the full
    # weights on every rank, with CPU initialisation) would be wasted work
    config = transformer_config(cfg, parallel, platform, perform_initialization=False)
    (model,) = build_gpt_chunks(cfg, parallel, platform, config)
    load_model([model], ckpt, strict=True)
    model.eval()
    return model, cfg, ckpt


def find_tokenizer(ckpt_dir: str, explicit: Optional[str] = None) -> str:
    """The tokenizer folder of a checkpoint (or ``explicit``).

    Raises:
        CheckpointError: none found (the message lists where it looked and the fix).
    """
    if explicit:
        if not os.path.isdir(explicit):
            raise CheckpointError(f"--tokenizer {explicit} is not a folder")
        return explicit
    candidates = tokenizer_candidates(ckpt_dir, layout.read_metadata(ckpt_dir))
    found = next((c for c in candidates if os.path.isdir(c)), None)
    if found is None:
        raise CheckpointError(f"no tokenizer folder for {ckpt_dir} (tried {candidates}); pass "
                              "--tokenizer DIR (e.g. the imported checkpoint's tokenizer/)")
    return found


def stop_token_ids(tokenizer: Any, tokenizer_dir: str) -> list[int]:
    """EOS ids: the tokenizer's and those of ``generation_config.json`` beside it, if any."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = os.path.join(tokenizer_dir, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return sorted(ids)
