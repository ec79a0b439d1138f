"""The platform a process computes on, decided once at its command-line entry point and passed down.

:func:`bootstrap` is the first call of every command that runs megatron-core or torch code
(``megatron-ift train``, ``generate``, ``convert``, the studies, the benchmarks and tools). It
answers, once per process, the questions the rest of the package would otherwise ask again and
again:

* **where to compute**: a real CUDA device (``cuda:<LOCAL_RANK>``, selected here), the CPU, or
  the emulated CUDA device of :mod:`megatron_ift.emulated_cuda` (``MEGATRON_IFT_EMULATE_CUDA=1``:
  the GPU code path with CPU arithmetic, failing where a GPU would);
* **which optional kernels exist**: Transformer Engine, apex's fused weight-gradient GEMM and
  megatron's fused softmax extensions (:class:`Kernels`; the fusion and layer-spec decisions
  are made from these facts, :func:`megatron_ift.models.fusions.fusion_settings`);

and switches on what the answer needs: the CPU compatibility layer
(:mod:`megatron_ift.cpu_compat`) or the emulator, TorchDynamo off where the fused kernels must run
eagerly, and the checkpoint-writer work-around of :mod:`megatron_ift.mcore_compat`. No module
does any of this when it is imported, and nothing outside this module asks
``torch.cuda.is_available()``: code that needs an answer takes the :class:`Platform`.

The host-synchronisation discipline of the training step lives here too (:meth:`Platform.no_host_sync`,
:meth:`Platform.once_per_step`): how a region that must not wait for the device is checked depends
on the platform (the emulator raises, a real GPU can use torch's sync debug mode).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import resource
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Optional

import torch

EMULATE_ENV = "MEGATRON_IFT_EMULATE_CUDA"
"""``1``: emulate a CUDA device (fail at the first violation); ``report``: list every violation."""
FORCE_CPU_ENV = "MEGATRON_IFT_FORCE_CPU"
"""``1``: compute on the CPU even where CUDA is available."""
SYNC_DEBUG_ENV = "MEGATRON_IFT_SYNC_DEBUG"
"""``1``/``error`` (or ``warn``): on a real GPU, torch's CUDA sync debug mode inside the
micro-batch loops."""

Kind = Literal["cpu", "cuda", "emulated_cuda"]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Kernels:
    """Optional compiled kernels a GPU run can use (all False on the CPU)."""

    transformer_engine: bool = False
    """``transformer_engine`` is importable: its layer spec, fused RoPE, FP8 and FusedAdam."""
    apex_gradient_accumulation: bool = False
    """apex's ``fused_weight_gradient_mlp_cuda``: megatron-core's own linear layers (the output
    layer always) need it for ``gradient_accumulation_fusion``."""
    megatron_softmax: bool = False
    """megatron's ``scaled_*_softmax_cuda`` extensions (``masked_softmax_fusion``)."""

    @staticmethod
    def detect(probe: Callable[[str], bool] = _importable) -> "Kernels":
        """What ``probe`` (by default: importability) finds in this environment."""
        return Kernels(
            transformer_engine=probe("transformer_engine"),
            apex_gradient_accumulation=probe("fused_weight_gradient_mlp_cuda"),
            megatron_softmax=probe("scaled_upper_triang_masked_softmax_cuda")
            and probe("scaled_masked_softmax_cuda"),
        )


@dataclass(frozen=True)
class Platform:
    """Where this process computes, and with which kernels.

    Made by :func:`bootstrap` at the entry point; tests may build one directly (a frozen value)
    to exercise the decisions a given container would make.
    """

    kind: Kind = "cpu"
    """``cpu``, ``cuda`` (a real device) or ``emulated_cuda``."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The compute device: everything that meets the model, a collective or a p2p call."""
    kernels: Kernels = field(default_factory=Kernels)
    """Optional kernels present (never any on the CPU)."""

    @property
    def cuda(self) -> bool:
        """The GPU code path runs (a real or an emulated CUDA device)."""
        return self.kind != "cpu"

    @property
    def real_cuda(self) -> bool:
        """A real CUDA device (pinned memory, CUDA memory statistics, sync debug mode)."""
        return self.kind == "cuda"

    @property
    def emulated(self) -> bool:
        return self.kind == "emulated_cuda"

    @property
    def backend(self) -> str:
        """The default torch.distributed backend: NCCL on a GPU (gloo stands in for it under
        emulation), gloo on the CPU."""
        return "nccl" if self.cuda else "gloo"

    def describe(self) -> str:
        """One line for run summaries."""
        if self.kind == "cpu":
            return "CPU"
        name = "emulated CUDA device (CPU arithmetic)" if self.emulated else torch.cuda.get_device_name(self.device)
        present = [k for k, v in vars(self.kernels).items() if v]
        return f"{name} ({', '.join(present) or 'no optional kernels'})"

    def peak_memory_gb(self) -> float:
        """Peak memory of this process: allocated CUDA memory on a real GPU, else the peak
        resident set of the process (the emulated device's tensors live in host memory)."""
        if self.real_cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    @contextlib.contextmanager
    def no_host_sync(self, region: str) -> Iterator[None]:
        """A region that must not make the host wait for the device (the micro-batch loops).

        Emulated device: a host synchronisation on a device tensor inside raises. Real GPU: with
        ``MEGATRON_IFT_SYNC_DEBUG=1`` torch's CUDA sync debug mode raises on synchronising
        calls (``warn``: a warning); otherwise nothing is checked (no cost). CPU: nothing.
        """
        if self.emulated:
            from megatron_ift import emulated_cuda

            with emulated_cuda.no_host_sync(region):
                yield
            return
        mode = os.environ.get(SYNC_DEBUG_ENV, "")
        if not (self.real_cuda and mode in ("1", "error", "warn")):
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn" if mode == "warn" else "error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    @contextlib.contextmanager
    def host_sync_allowed(self) -> Iterator[None]:
        """Lift :meth:`no_host_sync` for a block that synchronises once per step by design."""
        if self.emulated:
            from megatron_ift import emulated_cuda

            with emulated_cuda.host_sync_allowed():
                yield
            return
        if not self.real_cuda:
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def once_per_step(self, fn: Callable) -> Callable:
        """``fn`` (called inside a :meth:`no_host_sync` region, once per step) may synchronise:
        e.g. megatron-core's ``finalize_model_grads``, which reads the global token count on the
        host (``if num_tokens > 0``)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.host_sync_allowed():
                return fn(*args, **kwargs)

        return wrapper


_CURRENT: Optional[Platform] = None


def bootstrap(*, emulate: Optional[str] = None) -> Platform:
    """Decide this process's platform and switch on what it needs; idempotent.

    Call it first in a command-line entry point, before megatron-core is imported (importing
    it earlier is correct, only slower on the CPU: the fused kernels' ``torch.compile``
    decoration then imports TorchDynamo, about 2 s per process).

    Args:
        emulate: ``"1"`` or ``"report"`` to emulate a CUDA device on a machine without one;
            default: ``MEGATRON_IFT_EMULATE_CUDA``.

    Returns:
        The :class:`Platform`.

    Raises:
        RuntimeError: emulation asked for on a machine with a real CUDA device.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    from megatron_ift import mcore_compat

    mode = emulate if emulate is not None else os.environ.get(EMULATE_ENV, "")
    real_cuda = torch.cuda.is_available() and os.environ.get(FORCE_CPU_ENV) != "1"
    if mode in ("1", "report"):
        if real_cuda:
            raise RuntimeError(f"{EMULATE_ENV}={mode} on a machine with a CUDA device: use the real "
                               f"device (unset {EMULATE_ENV})")
        from megatron_ift import emulated_cuda

        emulated_cuda.enable(report=mode == "report")
        _eager_fusions()
        platform = Platform(kind="emulated_cuda", device=emulated_cuda.DEVICE, kernels=Kernels.detect())
    elif real_cuda:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        platform = Platform(kind="cuda", device=torch.device("cuda", index), kernels=Kernels.detect())
    else:
        from megatron_ift import cpu_compat

        cpu_compat.enable()
        _eager_fusions()
        platform = Platform()
    mcore_compat.make_checkpoint_children_die_with_parent()
    _CURRENT = platform
    return platform


def _eager_fusions() -> None:
    """Without a real GPU, megatron-core's ``torch.compile``-d fusion kernels run eagerly (the
    same functions; compiling them would build CPU code for kernels written for CUDA).

    The compatibility layers import megatron-core with its ``jit_fuser`` switched to a no-op
    (no TorchDynamo import at all); if megatron-core was imported before :func:`bootstrap`,
    its decorators already hold ``torch.compile`` wrappers, which TorchDynamo's own switch
    turns into plain calls.
    """
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].config.disable = True
