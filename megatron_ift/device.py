"""The compute device: one per rank, chosen once; how a micro-batch gets there; sync discipline.

A rank computes on CUDA when the process has a CUDA device (a real one, or the emulated one of
:mod:`megatron_ift.emulated_cuda` in CPU tests), else on the CPU. Everything that meets the model,
a collective or a point-to-point call is created on :func:`compute_device`; micro-batches arrive
from the data pipeline on the host (pinned on CUDA) and are moved in the training step.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

SYNC_DEBUG_ENV = "MEGATRON_IFT_SYNC_DEBUG"


def compute_device() -> torch.device:
    """This rank's device: ``cuda:<current>`` with CUDA (after ``torch.cuda.set_device``), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def pin(batch: dict[str, Any]) -> dict[str, Any]:
    """Page-locked copies of a host micro-batch, so the copy to a real GPU can overlap compute
    (no-op without a real CUDA device)."""
    if not _real_cuda():
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor on ``device`` (asynchronous from pinned host memory)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


@contextlib.contextmanager
def no_host_sync(region: str) -> Iterator[None]:
    """A region that must not synchronise the host with the device (the micro-batch loop).

    Emulated accelerator: a host sync on a device tensor inside raises. Real GPU: with
    ``MEGATRON_IFT_SYNC_DEBUG=1`` torch's CUDA sync debug mode raises on synchronising calls
    (``warn`` for a warning); otherwise nothing is checked (no cost).
    """
    from megatron_ift import emulated_cuda

    if emulated_cuda.active():
        with emulated_cuda.no_host_sync(region):
            yield
        return
    mode = os.environ.get(SYNC_DEBUG_ENV, "")
    if not (_real_cuda() and mode in ("1", "error", "warn")):
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn" if mode == "warn" else "error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def once_per_step(fn):
    """``fn`` (called inside a :func:`no_host_sync` region, once per step) may sync the host."""
    import functools

    from megatron_ift import emulated_cuda

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not emulated_cuda.active():
            return fn(*args, **kwargs)
        with emulated_cuda.host_sync_allowed():
            return fn(*args, **kwargs)

    return wrapper


def _real_cuda() -> bool:
    from megatron_ift import emulated_cuda

    return torch.cuda.is_available() and not emulated_cuda.active()
