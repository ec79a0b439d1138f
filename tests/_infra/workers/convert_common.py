"""Helpers of the conversion test workers (kept out of the entry scripts: megatron-core's first
checkpoint save spawns a process that re-imports the entry script, which should stay light)."""

import dataclasses
import json
import os

from common import PLATFORM, setup

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron_ift.checkpoint.layout import (
    iter_name,
    mark_latest,
    read_metadata,
    resolve,
    write_metadata,
)
from megatron_ift.checkpoint.model_io import load_model, save_model
from megatron_ift.models.config import ModelConfig
from megatron_ift.models.gpt import build_gpt_chunks


def pipeline_logits(model, tokens: torch.Tensor, hidden_size: int, pp: int):
    """Forward through the pipeline by hand (p2p of hidden states); full padded-vocab logits
    ``[b, s, v]`` on the last stage's TP rank 0, else None."""
    b, s = tokens.shape
    pos = torch.arange(s)[None].expand(b, s)
    group = parallel_state.get_pipeline_model_parallel_group()
    prank = parallel_state.get_pipeline_model_parallel_rank()
    ranks = dist.get_process_group_ranks(group)
    if prank > 0:
        hidden = torch.empty(s, b, hidden_size)  # [s, b, h]
        dist.recv(hidden, src=ranks[prank - 1])
        model.set_input_tensor(hidden)
    with torch.no_grad():
        y = model(tokens, pos, None)
    if prank < pp - 1:
        dist.send(y.contiguous(), dst=ranks[prank + 1])
        return None
    full = gather_from_tensor_model_parallel_region(y)  # [b, s, v/tp] -> [b, s, v]
    return full if parallel_state.get_tensor_model_parallel_rank() == 0 else None


def sharded_keys(chunk) -> dict:
    """Sharded key -> global shape (ShardedObjects: unique key -> None), factories applied."""
    ssd = chunk.sharded_state_dict()
    apply_factories(ssd)
    out = {}
    for sh in nested_values(ssd):
        if isinstance(sh, ShardedTensor):
            out[sh.key] = list(sh.global_shape)
        elif isinstance(sh, ShardedObject):
            out[sh.unique_key] = None
    return out


def run_spec(spec: dict) -> None:
    """See convert_logits.py."""
    for n, layout in enumerate(spec["layouts"]):
        if n:
            parallel_state.destroy_model_parallel()
        tp, pp, vpp = layout["tp"], layout["pp"], layout.get("vpp")
        par = setup(tp=tp, pp=pp, vpp=vpp, seed=99)
        dp_rank = parallel_state.get_data_parallel_rank()
        for j, job in enumerate(layout["jobs"]):
            ckpt = resolve(job["ckpt"])
            meta = read_metadata(ckpt)
            model = dataclasses.replace(ModelConfig(**meta["model"]), transformer_impl="local")
            chunks = build_gpt_chunks(model, par, PLATFORM)
            load_model(chunks, ckpt)
            if spec.get("keys_out") and n == 0 and j == 0 and dist.get_rank() == 0:
                with open(spec["keys_out"], "w") as f:
                    json.dump(sharded_keys(chunks[0]), f)
            if job.get("out"):
                (chunk,) = chunks  # the hand-written pipeline forward has no virtual stages
                logits = pipeline_logits(chunk, torch.load(job["tokens"]), model.hidden_size, pp)
                if logits is not None and dp_rank == 0:
                    torch.save(logits, job["out"])
            if job.get("resave"):
                target = os.path.join(job["resave"], iter_name(0))
                save_model(chunks, target)
                if dist.get_rank() == 0:
                    write_metadata(target, meta)
                    mark_latest(job["resave"], 0)
            dist.barrier()
