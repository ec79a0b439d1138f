"""Observe, in one process, the megatron-core 0.16.1 behaviours that megatron_ift.mcore_compat
works around, with the work-arounds *not* applied; writes what happened as JSON (argv[2]) for
tests/distributed/test_mcore_compat.py to judge. argv[1] is a scratch folder."""

import json
import os
import sys
import traceback

from common import PLATFORM, make_global_batch, setup, split_microbatches, tiny_model

import torch
from megatron.core import dist_checkpointing

from megatron_ift import mcore_compat
from megatron_ift.checkpoint.model_io import model_sharded_state_dict
from megatron_ift.ift import IFTConfig
from megatron_ift.training.engine import OptimizerConfig, build_model, build_optimizer
from megatron_ift.training.step import IFTStep


def _error(fn) -> str:
    """``ExceptionType: message`` of what ``fn()`` raises, or "" when it raises nothing."""
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 (recorded, judged by the test)
        return f"{type(exc).__name__}: {exc}"
    return ""


def _build(par):
    model = tiny_model()
    chunks, config = build_model(model, par, PLATFORM)
    return model, chunks, build_optimizer(chunks, OptimizerConfig(lr=1e-3), model, par, config)


def _train_one_step(model, chunks, optimizer):
    batch = make_global_batch(4, 16, model.vocab_size, seed=1)
    step = IFTStep(chunks, IFTConfig(), model.vocab_size, seq_length=16, micro_batch_size=2,
                   platform=PLATFORM)
    step(split_microbatches(batch, 0, 1, 2), step=0)
    optimizer.step()


def _sharded(chunks, optimizer, *, is_loading, metadata):
    model_sd = model_sharded_state_dict(chunks)
    return dict(model_sd, optimizer=optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                 metadata=metadata))


def main():
    scratch, out = sys.argv[1], sys.argv[2]
    par = setup(use_distributed_optimizer=True)
    found = {}
    model, chunks, optimizer = _build(par)

    # init_optimizer_state: a fresh distributed optimizer's state_dict needs Adam steps.
    found["fresh_state_dict"] = _error(optimizer.state_dict)

    _train_one_step(model, chunks, optimizer)
    # DISTRIB_OPTIM_SHARDING: saving with the default sharding type.
    default_dir = os.path.join(scratch, "default")
    os.makedirs(default_dir)
    found["save_default_sharding"] = _error(
        lambda: dist_checkpointing.save(_sharded(chunks, optimizer, is_loading=False, metadata=None), default_dir))
    ckpt = os.path.join(scratch, "reshardable")
    os.makedirs(ckpt)
    dist_checkpointing.save(_sharded(chunks, optimizer, is_loading=False,
                                     metadata=mcore_compat.DISTRIB_OPTIM_SHARDING), ckpt)

    # load_optimizer_state / restore_adam_steps: load into a new optimizer in one call.
    _, chunks2, optimizer2 = _build(par)
    mcore_compat.init_optimizer_state(optimizer2)
    loaded = dist_checkpointing.load(
        _sharded(chunks2, optimizer2, is_loading=True, metadata=mcore_compat.DISTRIB_OPTIM_SHARDING), ckpt)
    state = loaded["optimizer"]
    found["param_state_entries_have_step"] = any(
        "step" in v for v in _leaf_dicts(state.get("param_state", {})))
    found["one_call_load"] = _error(lambda: optimizer2.load_state_dict(dict(state)))
    # What the first of the two calls leaves: the parameters' ``step`` entries.
    state.pop("param_state_sharding_type", None)
    state.pop("param_state")
    optimizer2.load_state_dict(state)
    steps = [st["step"] for opt in mcore_compat.torch_optimizers(optimizer2) for st in opt.state.values()
             if "step" in st]
    found["step_entries"] = len(steps)
    found["distinct_step_tensors"] = len({id(s) for s in steps})

    # make_checkpoint_children_die_with_parent: the two hooks it wraps.
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    found["writer_hook"] = callable(getattr(fa.FileSystemWriterAsync, "write_preloaded_data", None))
    found["queue_hook"] = callable(getattr(fa, "_get_write_results_queue", None)) and hasattr(fa, "_results_queue")
    import megatron_ift.training.checkpointing  # noqa: F401  (installs the wrappers at import)

    found["writer_wrapped"] = getattr(fa.FileSystemWriterAsync.write_preloaded_data, "dies_with_parent", False)
    with open(out, "w") as f:
        json.dump(found, f)


def _leaf_dicts(node):
    if isinstance(node, dict):
        if any(isinstance(v, torch.Tensor) for v in node.values()):
            yield node
        for v in node.values():
            yield from _leaf_dicts(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _leaf_dicts(v)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
