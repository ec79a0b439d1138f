"""CPU compatibility for megatron-core 0.16.1: run its CUDA-assuming code paths on the CPU.

megatron-core hard-codes CUDA in a handful of places (``torch.cuda.current_device()`` as a
``device=`` argument, ``.cuda()`` calls, ``param.type() == 'torch.cuda.FloatTensor'`` checks in the
optimizers, the CUDA RNG tracker). This module redirects exactly those to the CPU so that the real
megatron-core code (``GPTModel``, tensor/sequence/pipeline parallelism, megatron DDP, the
distributed optimizer, ``dist_checkpointing``) runs in gloo process groups on machines without a
GPU: our tests, CI and CPU demo runs.

It is **opt-in**: :func:`megatron_ift.platform.bootstrap` switches it on, once per process,
when the process computes on the CPU (a GPU run never goes through it).

What it changes (each measured as needed with megatron-core 0.16.1 and torch 2.13 CPU):

* ``torch.cuda.current_device`` answers the CPU device; ``torch.cuda.synchronize`` and a few
  other no-op queries (memory stats, streams) do nothing instead of raising.
* one :class:`torch.overrides.TorchFunctionMode` maps any CUDA ``device=`` argument, ``.cuda()``
  and ``.to(<cuda>)`` to the CPU, and makes ``Tensor.type()`` (no argument) report the CUDA type
  name, which megatron-core's optimizers check.
* the CUDA RNG state functions (``torch.cuda.get_rng_state`` / ``set_rng_state`` /
  ``manual_seed`` and megatron-core's ``_get/_set_cuda_rng_state``) act on the CPU generator, so
  megatron-core's own ``CudaRNGStatesTracker`` (model-parallel dropout streams) and activation
  recomputation's RNG save/restore work unchanged on the CPU, where all randomness comes from
  that generator.
* if megatron-core is not imported yet, it is imported with its ``jit_fuser`` (``torch.compile``
  on decorated fusion kernels) replaced by megatron-core's own no-op decorator: the decoration
  alone imports TorchDynamo, about 2 s per process, for GPU fusion kernels that CPU runs never
  compile. Eager and compiled fusions compute the same functions.
* ``dist_checkpointing``'s write-results queue lives in a ``multiprocessing`` manager that
  megatron-core starts with ``spawn`` (safe next to CUDA; about 3 s, on the first save of every
  process). Without CUDA the manager is forked instead (milliseconds); megatron-core already
  forks its checkpoint writer processes.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None
_CPU = torch.device("cpu")

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is a CUDA ordinal for torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch function call in scope."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # page-locking is for host-to-GPU copies; no allocator here
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, "torch.cuda.FloatTensor")
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        return func(*args, **kwargs)


def is_enabled() -> bool:
    """Whether :func:`enable` has run in this process."""
    return _ENABLED


def enable() -> None:
    """Activate the CPU redirection for the rest of this process (idempotent).

    Called by :func:`megatron_ift.platform.bootstrap` for a CPU platform (never with CUDA).
    """
    global _ENABLED, _MODE
    if _ENABLED:
        return
    patch_cuda_runtime(current_device=lambda: _CPU)
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True


def patch_cuda_runtime(current_device) -> None:
    """Point the CUDA runtime queries megatron-core makes (device, synchronisation, memory
    statistics, streams, RNG state) at the CPU, and import megatron-core with eager fusions.

    Shared by :func:`enable` and the emulated accelerator (:mod:`megatron_ift.emulated_cuda`),
    which answers ``current_device()`` with CUDA ordinal 0 instead of the CPU device.
    """
    import_megatron_with_eager_fusions()
    torch.cuda.current_device = current_device  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue = _forked_write_results_queue
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state  # type: ignore[assignment]


def _eager(model=None, **_kwargs):
    """``torch.compile`` stand-in while megatron-core is imported: returns the function."""
    return model if model is not None else (lambda fn: fn)


def import_megatron_with_eager_fusions() -> None:
    """Import megatron-core with ``torch.compile`` passed through, then switch its ``jit_fuser``
    to the no-op decorator for modules imported later. No effect once megatron-core is loaded."""
    if "megatron.core" in sys.modules:
        return
    real = torch.compile
    torch.compile = _eager  # type: ignore[assignment]
    try:
        from megatron.core import jit

        jit.disable_jit_fuser()
    finally:
        torch.compile = real  # type: ignore[assignment]


def _forked_write_results_queue():
    """megatron-core's ``_get_write_results_queue`` with a forked (not spawned) manager."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_ift.child_processes import start_manager

    if filesystem_async._results_queue is None:
        # The manager process dies with the trainer (it would otherwise outlive a kill -9).
        filesystem_async._results_queue = start_manager(multiprocessing.get_context("fork")).Queue()
    return filesystem_async._results_queue


class _NullStream:
    """Stands in for a CUDA stream (``torch.cuda.Stream()`` too: megatron-core's TE attention makes
    one for context parallelism): waits and records are no-ops on the CPU."""

    def __init__(self, *_a, **_k) -> None:
        pass

    def wait_event(self, *_a, **_k) -> None:
        return None

    def wait_stream(self, *_a, **_k) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, *_a, **_k) -> None:
        return None
