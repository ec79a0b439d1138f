"""Full training checkpoints (model, optimizer, LR scheduler, data position, step) on
megatron-core dist_checkpointing, loadable at another TP/PP layout.

Randomness needs no saved state: every random draw of a step is keyed by (seed, step) (the
trainer re-seeds torch and megatron-core's RNG tracker per step; IFT's lambda noise and
sampling estimators are counter-based), so a resumed run repeats the uninterrupted one.

The megatron-core 0.16.1 behaviours worked around on the way (the distributed optimizer's
sharding type, Adam's ``step`` entries, the two-call optimizer load, checkpoint writer processes
that outlive a killed trainer: installed by :func:`megatron_ift.platform.bootstrap`) are in
:mod:`megatron_ift.mcore_compat`, each with a test of the upstream behaviour. Handled here: a distributed-optimizer checkpoint cannot be loaded into a
non-distributed optimizer (or the reverse): detected from the metadata and refused with an
explanation; torch's distributed-checkpoint ``CheckpointException`` derives from
``BaseException``, so it is caught by name to report the folder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_ift.checkpoint import layout
from megatron_ift.checkpoint.layout import CheckpointError
from megatron_ift.checkpoint.model_io import (
    LOAD_ERRORS,
    apply_model_state,
    load_model,
    model_sharded_state_dict,
)
from megatron_ift.distributed import rank as _rank
from megatron_ift.errors import StorageError
from megatron_ift.training import storage
from megatron_ift.mcore_compat import (
    DISTRIB_OPTIM_SHARDING,
    init_optimizer_state,
    load_optimizer_state,
    pop_adam_steps,
    restore_adam_steps,
    torch_optimizers,
)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(chunks, optimizer, *, is_loading: bool) -> dict[str, Any]:
    model_sd = model_sharded_state_dict(chunks)
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=DISTRIB_OPTIM_SHARDING
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
    resumed_from: Optional[str] = None,
) -> str:
    """Collectively save step ``step`` under ``root``; ``latest`` moves only once it is complete.

    Args:
        resumed_from: the checkpoint this process loaded, when ``step`` is the step it resumed
            at. Only that very folder is kept as it is (same state: e.g. preempted right after a
            resume); any other folder of this step is replaced, as it may hold another state
            or be damaged (the reason a user resumed past it).

    Returns:
        The checkpoint folder.
    """
    ckpt_dir = os.path.join(root, layout.iter_name(step))
    complete = os.path.isfile(os.path.join(ckpt_dir, layout.METADATA))
    if complete and resumed_from and os.path.samefile(resumed_from, ckpt_dir):
        _barrier()
        if _rank() == 0:
            layout.mark_latest(root, step)
        _barrier()
        return ckpt_dir
    replaced = None
    was_latest = False
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if complete:
            # Set the old folder aside (a name list_checkpoints ignores) until the new one is
            # committed; ``latest`` must not name it meanwhile.
            replaced = ckpt_dir + layout.REPLACED_SUFFIX
            if os.path.isdir(replaced):
                shutil.rmtree(replaced)
            was_latest = layout.resolve_name(root) == os.path.basename(ckpt_dir)
            if was_latest:
                os.remove(os.path.join(root, layout.LATEST))
                if resumed_from and os.path.dirname(os.path.abspath(resumed_from)) == os.path.abspath(root):
                    layout.atomic_write_text(os.path.join(root, layout.LATEST),
                                             os.path.basename(resumed_from) + "\n")
            os.replace(ckpt_dir, replaced)
        elif os.path.isdir(ckpt_dir):
            shutil.rmtree(ckpt_dir)  # a half-written folder of an interrupted save
        os.makedirs(ckpt_dir)
    _barrier()
    state = _state(chunks, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else {}
    state["data"] = data_state
    state["step"] = step
    try:
        dist_checkpointing.save(state, ckpt_dir)
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if isinstance(exc, KeyboardInterrupt):
            raise
        _discard_failed_save(root, ckpt_dir, step, replaced, was_latest, exc)
        raise
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        commit_checkpoint(root, ckpt_dir, step, metadata)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
        layout.prune(root, keep_last)
    _barrier()
    return ckpt_dir


def _discard_failed_save(root: str, ckpt_dir: str, step: int, replaced: Optional[str],
                         was_latest: bool, exc: BaseException) -> None:
    """After a failed save: drop the half-written folder (rank 0), put a folder it was replacing
    back, and raise :class:`StorageError` when the storage is at fault (probed with a real write,
    :func:`megatron_ift.training.storage.probe`); other failures propagate as they are."""
    cause = storage.probe(ckpt_dir)
    if _rank() == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if replaced and os.path.isdir(replaced):
            os.replace(replaced, ckpt_dir)
            if was_latest:
                layout.mark_latest(root, step)
    if cause is None:
        return
    latest = layout.resolve_name(root) if os.path.isdir(root) else None
    kept = f"the previous complete checkpoint {latest} stays latest" if latest else "no complete checkpoint exists yet"
    raise StorageError(
        f"saving {ckpt_dir}: {cause}; nothing of this save is kept and {kept}; free space or fix "
        "the folder's permissions or quota, then run again to resume"
    ) from exc


def commit_checkpoint(root: str, ckpt_dir: str, step: int, metadata: dict[str, Any]) -> None:
    """Rank 0, once every rank's shards are on disk: mark the checkpoint complete and latest.

    Its own function (the moment a save becomes visible), so that tests can interrupt a save
    exactly here by wrapping it; production code has no fault-injection switch."""
    layout.write_metadata(ckpt_dir, dict(metadata, step=step))
    layout.mark_latest(root, step)


@dataclass(frozen=True)
class Restored:
    """What a loaded training checkpoint hands back besides the model and optimizer state."""

    step: int
    """Optimizer steps done when it was saved."""
    data_state: dict[str, Any]
    """The training data iterator's position (``MicroBatchIterator.state_dict``)."""
    metadata: dict[str, Any]
    """Its ``megatron_ift.json`` (the saved config under ``config``)."""


def load_checkpoint(
    ckpt_dir: str,
    chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    *,
    use_distributed_optimizer: bool,
    override_scheduler: bool = False,
) -> Restored:
    """Collectively load a full training checkpoint into ``chunks``, ``optimizer`` and ``scheduler``.

    Args:
        override_scheduler: keep the scheduler's configured schedule (lr, steps, ...) and take
            only the step count from the checkpoint (``checkpoint.override_scheduler``).
    """
    meta = layout.read_metadata(ckpt_dir)
    layout.check_files(ckpt_dir)
    saved_dist = meta.get("parallel", {}).get("use_distributed_optimizer")
    if optimizer is not None and saved_dist is not None and saved_dist != use_distributed_optimizer:
        raise CheckpointError(
            f"{ckpt_dir} was saved with parallel.use_distributed_optimizer={saved_dist} but this "
            f"run uses {use_distributed_optimizer}; megatron-core cannot convert between the two "
            "optimizer formats. Resume with the same setting (the model/parallel layout may differ)"
        )
    if optimizer is not None:
        init_optimizer_state(optimizer)
        configured = _group_lrs(optimizer)
    state = _state(chunks, optimizer, is_loading=True)
    state["scheduler"] = None
    state["data"] = None
    state["step"] = None
    try:
        loaded = dist_checkpointing.load(state, ckpt_dir)
    except LOAD_ERRORS as exc:  # name the folder; dist_checkpointing raises many types
        raise CheckpointError(
            f"could not load {ckpt_dir} ({_cause(exc)}): the checkpoint is damaged (a truncated "
            "or missing shard) or from a different model." + layout.earlier_checkpoints_hint(ckpt_dir)
        ) from exc
    apply_model_state(chunks, loaded)
    if optimizer is not None:
        # The fully_reshardable loader copies every state entry it finds into per-parameter
        # tensors but carries no Adam ``step``: take the steps out, restore them afterwards.
        adam_step = pop_adam_steps(loaded["optimizer"])
        load_optimizer_state(optimizer, loaded["optimizer"])
        restore_adam_steps(optimizer, int(loaded["step"]) if adam_step is None else adam_step)
        if override_scheduler:
            # megatron-core's scheduler reads each group's max_lr / min_lr, which the optimizer
            # state just restored to the checkpoint's values: put the configured ones back.
            _set_group_lrs(optimizer, configured)
    if scheduler is not None and loaded.get("scheduler"):
        if override_scheduler:
            # megatron-core's own switch: configured values win, the step count is restored.
            scheduler.override_opt_param_scheduler = True
            scheduler.use_checkpoint_opt_param_scheduler = False
        scheduler.load_state_dict(loaded["scheduler"])
    return Restored(step=int(loaded["step"]), data_state=loaded["data"], metadata=meta)


_LR_KEYS = ("max_lr", "min_lr")


def _group_lrs(optimizer) -> list[list[dict[str, float]]]:
    return [[{k: g[k] for k in _LR_KEYS if k in g} for g in opt.param_groups]
            for opt in torch_optimizers(optimizer)]


def _set_group_lrs(optimizer, values: list[list[dict[str, float]]]) -> None:
    for opt, groups in zip(torch_optimizers(optimizer), values):
        for group, lrs in zip(opt.param_groups, groups):
            group.update(lrs)


def _cause(exc: BaseException) -> str:
    """The innermost useful cause of a (possibly wrapped) load error, on one line."""
    failures = getattr(exc, "failures", None)  # torch's CheckpointException: {rank: exception}
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        exc = getattr(inner, "exc", inner) if not isinstance(inner, BaseException) else inner
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_pretrained(ckpt_dir: str, chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """Model weights only (a converted Hugging Face model or another run's checkpoint)."""
    meta = layout.read_metadata(ckpt_dir)
    load_model(chunks, ckpt_dir)
    return meta
