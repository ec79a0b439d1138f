"""Work-arounds for megatron-core 0.16.1 behaviours that get in the way of checkpointing.

Each is measured, and each has a test in ``tests/distributed/test_mcore_compat.py`` that asserts the upstream
behaviour it exists for, so that a megatron-core upgrade that fixes or changes it fails a test
and the work-around can be removed or adapted (the CPU-specific redirections live in
:mod:`megatron_ift.cpu_compat`, and megatron-core's missing CPU paths are no work-arounds of bugs):

* :data:`DISTRIB_OPTIM_SHARDING`: the distributed optimizer's default sharding type
  (``fully_sharded_model_space``) fails on save (``ShardedTensor.flattened_range is not
  supported``); ``fully_reshardable`` saves, and loads at any layout.
* :func:`init_optimizer_state`: ``DistributedOptimizer.state_dict`` (called while building the
  sharded state dict for *loading*) asserts that every parameter has an Adam ``step``, which a
  fresh optimizer has not: each parameter gets an all-zero state first.
* :func:`load_optimizer_state`: without apex / Transformer Engine,
  ``DistributedOptimizer.load_state_dict`` gives every parameter's state one shared ``step``
  entry, and then fails (``KeyError: 'step'``) copying the ``fully_reshardable`` parameter state,
  whose entries carry no ``step``: the parameter state is loaded in a second call after the
  ``step`` entries are removed.
* :func:`pop_adam_steps` / :func:`restore_adam_steps`: the loaded state holds no per-parameter
  ``step`` (or shared ones); torch's AdamW increments ``step`` in place, so a tensor shared by
  all parameters would advance once per parameter per step: every parameter gets a ``step``
  tensor of its own holding the number of updates (fused optimizers, which keep it in their
  param groups, get it there).
* :func:`make_checkpoint_children_die_with_parent`: dist_checkpointing forks writer processes
  and starts a ``multiprocessing`` manager for their results during a save; neither dies with
  the trainer, so a killed trainer would leave children holding its stdout (``| tee``, a Slurm
  step) open. The two megatron-core hooks that start them are wrapped.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch

from megatron_ift.checkpoint.layout import CheckpointError
from megatron_ift.child_processes import die_with_parent, start_manager

DISTRIB_OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
"""``metadata`` for ``optimizer.sharded_state_dict``: a checkpoint loadable at any layout."""


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron-core (possibly chained) optimizer."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in inner if getattr(o, "optimizer", None) is not None]


def init_optimizer_state(optimizer) -> None:
    """Give every parameter an (all-zero) Adam state so that loading has targets.

    Args:
        optimizer: a megatron-core optimizer; its real state is restored by loading and
            :func:`restore_adam_steps`.
    """
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    # Host 0-dim, as torch's non-capturable Adam keeps it on a GPU too.
                    st["step"] = torch.zeros((), dtype=torch.float32)


def load_optimizer_state(optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, in two calls for a fully reshardable
    distributed-optimizer state (see the module docstring).

    Raises:
        CheckpointError: a distributed-optimizer state of another sharding type.
    """
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if not (isinstance(state, dict) and "param_state" in state and len(chained) == 1):
        optimizer.load_state_dict(state)
        return
    sharding = state.pop("param_state_sharding_type", None)
    param_state = state.pop("param_state")
    if sharding != DISTRIB_OPTIM_SHARDING["distrib_optim_sharding_type"]:
        raise CheckpointError(
            f"distributed-optimizer state was saved as {sharding!r}; only 'fully_reshardable' "
            "checkpoints (what megatron-ift writes) can be loaded"
        )
    optimizer.load_state_dict(state)
    for opt in torch_optimizers(optimizer):
        for entry in opt.state.values():
            entry.pop("step", None)
    chained[0].load_parameter_state_from_fully_reshardable(param_state)


def pop_adam_steps(tree: Any) -> Optional[int]:
    """Remove the per-parameter ``step`` entries of every torch optimizer state in ``tree``.

    Returns:
        The number of updates (from those entries or the param groups' ``step``), or None
        when ``tree`` holds none.
    """
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
                        found.append(float(entry.pop("step")))
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(tree)
    return int(max(found)) if found else None


def restore_adam_steps(optimizer, step: int) -> None:
    """Put the number of updates back where each optimizer keeps it.

    torch's Adam/AdamW keep it per parameter: every parameter with Adam state gets a ``step``
    tensor of its own (AdamW increments it in place). Transformer Engine's and apex's FusedAdam
    keep it in the param groups (``group["step"]``) and allow no other per-parameter state than
    their moments and master weights: TE's ``FusedAdam.state_dict`` maps every state name through
    its dtype table and raises ``KeyError: 'step'`` for a per-parameter one (review finding 3),
    so for them only the groups are set.
    """
    for opt in torch_optimizers(optimizer):
        per_parameter = isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
        for group in opt.param_groups:
            if not per_parameter:
                group["step"] = int(step)
                continue
            for p in group["params"]:
                st = opt.state.get(p)
                if st and "exp_avg" in st:
                    st["step"] = torch.tensor(float(step), dtype=torch.float32)


# -- checkpoint writer processes die with the trainer ---------------------------------------

_MAIN_PID = os.getpid()


def _writer_dies_with_parent(write):
    @functools.wraps(write)
    def wrapper(*args, **kwargs):
        if os.getpid() != _MAIN_PID:  # a forked writer (index 0 may run in the trainer itself)
            die_with_parent()
        return write(*args, **kwargs)

    wrapper.dies_with_parent = True
    return wrapper


def _results_queue_dying_with_parent():
    """megatron-core's ``_get_write_results_queue`` (a spawned manager) whose manager process
    dies with the trainer. (Without CUDA, ``cpu_compat`` installs its forked equivalent.)"""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = start_manager(multiprocessing.get_context("spawn")).Queue()
    return filesystem_async._results_queue


def make_checkpoint_children_die_with_parent() -> None:
    """Wrap dist_checkpointing's writer entry point and results-queue factory (idempotent).

    megatron-core looks both up at every save (the writer on its class, the factory in its
    module), so wrapping them here reaches every forked writer without touching its files.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    write = filesystem_async.FileSystemWriterAsync.write_preloaded_data
    if not getattr(write, "dies_with_parent", False):
        filesystem_async.FileSystemWriterAsync.write_preloaded_data = staticmethod(
            _writer_dies_with_parent(write))
    if filesystem_async._get_write_results_queue.__module__ == filesystem_async.__name__:
        filesystem_async._get_write_results_queue = _results_queue_dying_with_parent
