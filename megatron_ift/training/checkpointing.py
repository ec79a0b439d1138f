"""Full training checkpoints (model, optimizer, LR scheduler, data position, step) on
megatron-core dist_checkpointing, loadable at another TP/PP layout.

Randomness needs no saved state: every random draw of a step is keyed by (seed, step) (the
trainer re-seeds torch and megatron-core's RNG tracker per step; IFT's lambda noise and
sampling estimators are counter-based), so a resumed run repeats the uninterrupted one.

megatron-core 0.16.1 traps handled here (measured):
* the distributed optimizer must be saved with the ``fully_reshardable`` sharding type (the
  default fails on save) to be loadable at another layout;
* loading into a plain ``torch.optim.AdamW`` (the only Adam without apex/TE) needs its state
  initialised first, missing ``step`` entries filled, and every parameter's ``step`` tensor
  cloned after ``load_state_dict`` (otherwise all parameters share one ``step`` tensor, AdamW
  advances it once per parameter and the second step after resume is wrong);
* a distributed-optimizer checkpoint cannot be loaded into a non-distributed optimizer (or the
  reverse): detected from the metadata and refused with an explanation.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_ift.checkpoint import layout
from megatron_ift.checkpoint.layout import CheckpointError
from megatron_ift.checkpoint.model_io import apply_model_state, model_sharded_state_dict

# Tests only: "kill_before_commit:<step>" SIGKILLs rank 0 in the middle of that step's save.
FAULT_ENV = "MEGATRON_IFT_FAULT_INJECTION"
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(chunks, optimizer, *, is_loading: bool) -> dict[str, Any]:
    model_sd = model_sharded_state_dict(chunks)
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_SHARDING
        )
    return state


def save_checkpoint(
    root: str,
    step: int,
    chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    *,
    data_state: dict[str, Any],
    metadata: dict[str, Any],
    keep_last: int,
) -> str:
    """Collectively save step ``step`` under ``root``; ``latest`` moves only once it is complete.

    Returns the checkpoint folder.
    """
    ckpt_dir = os.path.join(root, layout.iter_name(step))
    if os.path.isfile(os.path.join(ckpt_dir, layout.METADATA)):
        # A complete checkpoint of this very step exists (e.g. preempted right after a resume):
        # the state is the same, so keep it rather than delete and rewrite it.
        _barrier()
        if _rank() == 0:
            layout.mark_latest(root, step)
        _barrier()
        return ckpt_dir
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(ckpt_dir):
            shutil.rmtree(ckpt_dir)  # a half-written folder of an interrupted save
        os.makedirs(ckpt_dir)
    _barrier()
    state = _state(chunks, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else {}
    state["data"] = data_state
    state["step"] = step
    dist_checkpointing.save(state, ckpt_dir)
    if os.environ.get(FAULT_ENV) == f"kill_before_commit:{step}" and _rank() == 0:
        # Fault injection for tests: die after the shards are written, before the commit.
        os.kill(os.getpid(), 9)
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        layout.write_metadata(ckpt_dir, dict(metadata, step=step))
        layout.mark_latest(root, step)
        layout.prune(root, keep_last)
    _barrier()
    return ckpt_dir


def load_checkpoint(
    ckpt_dir: str,
    chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    *,
    use_distributed_optimizer: bool,
) -> dict[str, Any]:
    """Collectively load a full training checkpoint; returns ``{"step", "data", "metadata"}``."""
    meta = layout.read_metadata(ckpt_dir)
    saved_dist = meta.get("parallel", {}).get("use_distributed_optimizer")
    if optimizer is not None and saved_dist is not None and saved_dist != use_distributed_optimizer:
        raise CheckpointError(
            f"{ckpt_dir} was saved with parallel.use_distributed_optimizer={saved_dist} but this "
            f"run uses {use_distributed_optimizer}; megatron-core cannot convert between the two "
            "optimizer formats. Resume with the same setting (the model/parallel layout may differ)"
        )
    if optimizer is not None:
        _init_optimizer_state(optimizer)
    state = _state(chunks, optimizer, is_loading=True)
    state["scheduler"] = None
    state["data"] = None
    state["step"] = None
    try:
        loaded = dist_checkpointing.load(state, ckpt_dir)
    except Exception as exc:  # name the folder; dist_checkpointing raises many types
        raise CheckpointError(
            f"could not load {ckpt_dir}: {type(exc).__name__}: {exc}. The checkpoint may be corrupt "
            "or from a different model; resume from an earlier iter_* folder"
        ) from exc
    apply_model_state(chunks, loaded)
    if optimizer is not None:
        # The fully_reshardable loader copies every state entry it finds into per-parameter
        # tensors but carries no Adam ``step``: take the steps out, restore them afterwards.
        adam_step = _pop_adam_steps(loaded["optimizer"])
        _load_optimizer_state(optimizer, loaded["optimizer"])
        _fix_adam_steps(optimizer, int(loaded["step"]) if adam_step is None else adam_step)
    if scheduler is not None and loaded.get("scheduler"):
        scheduler.load_state_dict(loaded["scheduler"])
    return {"step": int(loaded["step"]), "data": loaded["data"], "metadata": meta}


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in inner if getattr(o, "optimizer", None) is not None]


def _init_optimizer_state(optimizer) -> None:
    """Give every parameter an (all-zero) Adam state so that load_state_dict has targets.

    megatron-core's ``DistributedOptimizer.state_dict`` (called while building the sharded
    state dict for loading) requires a ``step`` in every entry; the real value is restored by
    :func:`_fix_adam_steps` after loading."""
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    st["step"] = torch.zeros((), dtype=torch.float32)


def _load_optimizer_state(optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` with a work-around for the distributed optimizer.

    Without apex/TE, megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict`` gives every
    parameter one shared ``step`` tensor and then fails (``KeyError: 'step'``) copying the
    fully_reshardable parameter state, whose entries have no ``step``. So the parameter state is
    loaded in a second call, after the shared ``step`` entries are removed.
    """
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if not (isinstance(state, dict) and "param_state" in state and len(chained) == 1):
        optimizer.load_state_dict(state)
        return
    sharding = state.pop("param_state_sharding_type", None)
    param_state = state.pop("param_state")
    if sharding != "fully_reshardable":
        raise CheckpointError(
            f"distributed-optimizer state was saved as {sharding!r}; only 'fully_reshardable' "
            "checkpoints (what megatron-ift writes) can be loaded"
        )
    optimizer.load_state_dict(state)
    for opt in _torch_optimizers(optimizer):
        for entry in opt.state.values():
            entry.pop("step", None)
    chained[0].load_parameter_state_from_fully_reshardable(param_state)


def _pop_adam_steps(tree: Any) -> Optional[int]:
    """Remove per-parameter ``step`` entries from every torch optimizer state in ``tree`` and
    return the number of updates (from them or from the param groups' ``step``)."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for group in node.get("param_groups", []) if isinstance(node.get("param_groups"), list) else []:
                if isinstance(group, dict) and "step" in group:
                    found.append(float(group["step"]))
            state = node.get("state")
            if isinstance(state, dict):
                for entry in state.values():
                    if isinstance(entry, dict) and "step" in entry:
                        v = entry.pop("step")
                        found.append(float(v))
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(tree)
    return int(max(found)) if found else None


def _fix_adam_steps(optimizer, step: int) -> None:
    """Every parameter gets its own ``step`` tensor holding the number of updates so far."""
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p)
                if st and "exp_avg" in st:
                    # A tensor of its own per parameter: AdamW increments it in place.
                    st["step"] = torch.tensor(float(step), dtype=torch.float32)


def load_pretrained(ckpt_dir: str, chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """Model weights only (a converted Hugging Face model or another run's checkpoint)."""
    from megatron_ift.checkpoint.model_io import load_model

    meta = layout.read_metadata(ckpt_dir)
    load_model(chunks, ckpt_dir)
    return meta
