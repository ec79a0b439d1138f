"""Memory and layout planning for megatron-core GPT training with IFT.

``plan(model, Cluster(...), Workload(...))`` enumerates the valid TP x PP x DP (x VPP) layouts,
sizes per-GPU memory (exact training state, modelled activations, IFT's estimation pass) and ranks
the layouts that fit by an estimated step time. ``tools/plan.py`` is its command line.
"""

from megatron_ift.planning.activations import MicroBatch, saved_bytes, stage_peak
from megatron_ift.planning.params import (
    BufferLayout,
    ParamTensor,
    StateMemory,
    buffer_layout,
    chunk_parameters,
    shard_numel,
    state_memory,
)
from megatron_ift.planning.planner import Candidate, Cluster, Layout, Plan, Workload, plan
from megatron_ift.planning.presets import PRESETS, get_preset
from megatron_ift.planning.report import render, to_dict

__all__ = [
    "BufferLayout",
    "Candidate",
    "Cluster",
    "Layout",
    "MicroBatch",
    "PRESETS",
    "ParamTensor",
    "Plan",
    "StateMemory",
    "Workload",
    "buffer_layout",
    "chunk_parameters",
    "get_preset",
    "plan",
    "render",
    "saved_bytes",
    "shard_numel",
    "stage_peak",
    "state_memory",
    "to_dict",
]
