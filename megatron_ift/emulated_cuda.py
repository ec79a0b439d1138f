"""An emulated CUDA device for CPU machines: a GPU's placement rules, with real CPU arithmetic.

:mod:`megatron_ift.cpu_compat` runs megatron-core on the CPU by mapping every CUDA placement to
the CPU, which also hides every placement bug a GPU run would hit first: a host batch fed to a
CUDA model, a host buffer handed to NCCL, a ``.item()`` per micro-batch that stalls the stream.
This module is the strict alternative for tests (and for trying a config's GPU path on a laptop):
the process believes it has one CUDA device (``torch.cuda.is_available`` answers True, so our code and
megatron-core's take their GPU branches), the arithmetic still runs on the CPU (losses can be
compared with a normal CPU run), and what a real GPU would refuse fails here too.

How: every tensor placed on "cuda" (a factory call with a CUDA ``device=``, ``.cuda()``,
``.to("cuda")``) is recorded as a *device tensor*; a :class:`TorchDispatchMode` propagates the
record through every ATen op (backward included) and checks each op:

* an op mixing device tensors with host tensors raises :class:`EmulatedDeviceError` (host 0-dim
  tensors are allowed, as CUDA allows them as scalars; ``copy_`` is the one cross-device op);
* a collective or point-to-point op on a group that would be NCCL on a GPU (the default group
  and every group not created with ``backend="gloo"``) raises if any tensor is on the host;
* host synchronisations (``.item()``, ``float()``, ``.tolist()``, ``.cpu()``, ``nonzero`` and
  other data-dependent shapes) on device tensors are counted, and raise inside a region declared
  with :func:`no_host_sync` (the micro-batch loop).

``t.device`` of a device tensor reports ``cuda:0`` so that code deriving placement from an input
(``torch.arange(n, device=x.device)``) behaves as on a GPU. NCCL is stood in for by gloo, fusion
kernels run eagerly (no ``torch.compile``), and Transformer Engine / apex stay absent, so the
emulation proves placement and synchronisation, not kernels or speed.

It is switched on by :func:`megatron_ift.platform.bootstrap` when ``MEGATRON_IFT_EMULATE_CUDA=1``
(or ``report``) is set: any command-line entry point runs that way.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from megatron_ift import cpu_compat
from megatron_ift.cpu_compat import _CUDA_TYPE_NAMES, _is_cuda_device

DEVICE = torch.device("cuda", 0)
_CPU = torch.device("cpu")


class EmulatedDeviceError(RuntimeError):
    """A placement or synchronisation that a real GPU run would refuse or stall on."""


class _State:
    def __init__(self) -> None:
        self.active = False
        self.host_syncs = 0
        self.no_sync: Optional[str] = None  # the region that forbids host syncs, if any
        self.gloo_groups: set[str] = set()  # group names created with backend="gloo"
        self.report = False  # record violations instead of raising
        self.violations: dict[tuple[str, str], str] = {}


_STATE = _State()
_ON_DEVICE = WeakIdKeyDictionary()  # tensors placed on the emulated device -> True

aten = torch.ops.aten
# Ops whose result shape depends on the data: a CUDA stream must finish before they return.
_SYNC_OPS = {
    aten._local_scalar_dense, aten.nonzero, aten.unique_consecutive, aten._unique2,
    aten.unique_dim, aten.masked_select, aten.is_nonzero,
}
# Ops that legitimately read one side from the host (cross-device copy).
_CROSS_DEVICE_OPS = {aten.copy_, aten._to_copy}
# Collectives that carry no user tensor (NCCL makes its own device buffer for a barrier).
_TENSORLESS_COLLECTIVES = {"barrier", "monitored_barrier"}


def active() -> bool:
    """Whether the emulated accelerator is on in this process."""
    return _STATE.active


def on_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on the emulated device (False for every tensor when inactive)."""
    return t in _ON_DEVICE


def host_syncs() -> int:
    """Host synchronisations on device tensors so far in this process."""
    return _STATE.host_syncs


@contextlib.contextmanager
def no_host_sync(region: str) -> Iterator[None]:
    """Inside the block a host synchronisation on a device tensor raises (no-op when inactive)."""
    if not _STATE.active:
        yield
        return
    outer, _STATE.no_sync = _STATE.no_sync, region
    try:
        yield
    finally:
        _STATE.no_sync = outer


@contextlib.contextmanager
def host_sync_allowed() -> Iterator[None]:
    """Lift :func:`no_host_sync` for a block that syncs once per step by design."""
    outer, _STATE.no_sync = _STATE.no_sync, None
    try:
        yield
    finally:
        _STATE.no_sync = outer


def _tensors(*trees: Any) -> list[torch.Tensor]:
    """The tensors in op arguments/results: tensors, and lists/tuples/dicts of them (what ATen
    signatures hold; a faster walk than pytree's for the per-op hot path)."""
    out: list[torch.Tensor] = []
    stack = list(trees)
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return out


def _mark(out: Any) -> None:
    for t in _tensors(out):
        _ON_DEVICE[t] = True


def _unmark(t: torch.Tensor) -> None:
    _ON_DEVICE.pop(t, None)


def _host_sync(what: str) -> None:
    _STATE.host_syncs += 1
    if _STATE.no_sync is not None:
        _violation(
            f"host synchronisation ({what}) on a device tensor inside {_STATE.no_sync}: on a GPU "
            "it stalls the stream once per micro-batch; keep the value on the device and read it "
            "once per step"
        )


def _violation(message: str) -> None:
    """Raise, or in report mode (```MEGATRON_IFT_EMULATE_CUDA=report```) record the violation with
    the innermost project frame and go on, so one run lists every defect of a code path."""
    if not _STATE.report:
        raise EmulatedDeviceError(message)
    frames = [f for f in traceback.extract_stack()[:-2] if "megatron_ift" in f.filename
              and not f.filename.endswith("emulated_cuda.py")]
    where = f"{frames[-1].filename.split('megatron_ift')[-1]}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"
    key = (where, message.split(":")[0][:60])
    if key not in _STATE.violations:
        _STATE.violations[key] = message
        print(f"[emulated cuda] megatron_ift{where}: {message}", file=sys.stderr, flush=True)


def _describe(tensors) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors[:4])


def _is_cpu(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cpu"
    return isinstance(device, str) and device.startswith("cpu")


_DEVICE_GET = torch.Tensor.device.__get__
_IS_CUDA_GET = torch.Tensor.is_cuda.__get__
_DATA_GET = torch.Tensor.data.__get__
_DATA_SET = torch.Tensor.data.__set__


class _PlacementMode(TorchFunctionMode):
    """Python-level placement: CUDA ``device=`` arguments, ``.cuda()`` / ``.to()`` / ``.cpu()``,
    and what a device tensor reports about itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", None) in ("__get__", "__set__"):
            # Property accessors are new method-wrapper objects on every access: compare by ==.
            if func == _DEVICE_GET:
                return DEVICE if on_device(args[0]) else func(*args)
            if func == _IS_CUDA_GET:
                return on_device(args[0])
            if func == _DATA_GET:
                out = func(*args)
                if on_device(args[0]):
                    _mark(out)
                return out
            if func == _DATA_SET:
                func(*args)
                (_mark if on_device(args[1]) else _unmark)(args[0])
                return None
            return func(*args, **kwargs)
        if func is torch.Tensor.get_device:
            return 0 if on_device(args[0]) else func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and on_device(args[0]):
            return _CUDA_TYPE_NAMES.get(args[0].dtype, "torch.cuda.FloatTensor")
        if func is torch.Tensor.cuda:
            return self._to_device(args[0])
        if func is torch.Tensor.cpu:
            return self._to_host(args[0], "cpu()")
        if func in (torch.Tensor.pin_memory, torch.Tensor.is_pinned):
            return args[0] if func is torch.Tensor.pin_memory else False  # no pinned memory here
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # a factory's pinned host tensor: a plain one here
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and on_device(args[0]):
            _host_sync(func.__name__ + "()")
            return func(*args, **kwargs)
        if func is torch.Tensor.to:
            return self._to(args, kwargs)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
            out = func(*args, **kwargs)
            _mark(out)
            return out
        return func(*args, **kwargs)

    @staticmethod
    def _to_device(t: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if on_device(t):
            return t if out is None else out
        out = t.clone() if out is None or out is t else out  # a GPU copy is a new tensor
        _mark(out)
        return out

    @staticmethod
    def _to_host(t: torch.Tensor, what: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not on_device(t):
            return t if out is None else out
        _host_sync(what)
        out = t.clone() if out is None or out is t else out
        _unmark(out)
        return out

    def _to(self, args, kwargs):
        t, rest = args[0], list(args[1:])
        target = kwargs.get("device")
        for i, a in enumerate(rest):
            if isinstance(a, torch.Tensor):  # .to(other): other's device and dtype
                target = DEVICE if on_device(a) else _CPU
                rest[i] = a.dtype
            elif isinstance(a, (torch.device, str)) or (isinstance(a, int) and not isinstance(a, bool)):
                target = a
                rest[i] = _CPU
        if "device" in kwargs:
            kwargs["device"] = _CPU
        out = torch.Tensor.to(t, *rest, **kwargs)
        if target is not None and _is_cuda_device(target):
            return self._to_device(t, out)
        if target is not None and _is_cpu(target):
            return self._to_host(t, "to(cpu)", out)
        return out


class _PlacementChecker(TorchDispatchMode):
    """ATen-level: propagate device placement through every op and check what a GPU checks."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        if func.namespace == "c10d":
            _check_collective(func, args, tensors)
            return func(*args, **kwargs)
        device = [t for t in tensors if on_device(t)]
        if not device:
            return func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            _host_sync(str(packet))
        if packet not in _CROSS_DEVICE_OPS:
            host = [t for t in tensors if not on_device(t) and t.dim() > 0]
            if host:
                _violation(
                    f"{func} mixes device tensors ({_describe(device)}) with host tensors "
                    f"({_describe(host)}): move them to the compute device first"
                )
        out = func(*args, **kwargs)
        if packet is aten.copy_:
            if not on_device(args[0]):
                _host_sync("copy device -> host")
            return out
        _mark(out)
        return out


def _check_collective(func, args, tensors) -> None:
    name = func.overloadpacket.__name__.rstrip("_")
    if name in _TENSORLESS_COLLECTIVES:
        return
    group = None
    for spec, value in zip(func._schema.arguments, args):
        if "ProcessGroup" in str(spec.type):
            group = dist.ProcessGroup.unbox(value).group_name
    if group in _STATE.gloo_groups:
        return
    host = [t for t in tensors if not on_device(t)]
    if host:
        _violation(
            f"{func}: host tensors ({_describe(host)}) handed to a collective on process group "
            f"{group!r}, which is NCCL on a GPU (NCCL takes device tensors only); create them on "
            "the compute device, or communicate CPU objects over an explicit gloo group"
        )


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: timing events record nothing."""

    def __init__(self, *_a, **_k) -> None:
        pass

    def record(self, *_a, **_k) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, _other) -> float:
        return 0.0


def _patch_distributed() -> None:
    """NCCL is stood in for by gloo; remember which groups a GPU run would also make gloo."""
    real_init, real_new_group = dist.init_process_group, dist.new_group

    def init_process_group(*args, **kwargs):
        if args and str(args[0]).lower() == "nccl":
            args = ("gloo",) + tuple(args[1:])
        if str(kwargs.get("backend", "")).lower() == "nccl":
            kwargs["backend"] = "gloo"
        kwargs.pop("device_id", None)
        return real_init(*args, **kwargs)

    def new_group(*args, **kwargs):
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        group = real_new_group(*args, **kwargs)
        if backend is not None and str(backend).lower() == "gloo" and group is not None:
            if not isinstance(group, int):  # GroupMember.NON_GROUP_MEMBER on non-members
                _STATE.gloo_groups.add(group.group_name)
        return group

    def object_coll_device(group=None):
        pg = group or dist.distributed_c10d._get_default_group()
        return _CPU if pg.group_name in _STATE.gloo_groups else DEVICE

    dist.init_process_group = c10d.init_process_group = init_process_group
    dist.new_group = c10d.new_group = new_group
    c10d._get_object_coll_device = object_coll_device


def _patch_parameter() -> None:
    """``nn.Parameter(t)`` wraps ``t`` without an ATen op: carry the placement over."""
    real_new = torch.nn.Parameter.__new__

    def new(cls, data=None, requires_grad=True):
        out = real_new(cls, data, requires_grad)
        if data is not None and on_device(data):
            _ON_DEVICE[out] = True
        return out

    torch.nn.Parameter.__new__ = new  # type: ignore[assignment]


class _QuietRngFork(logging.Filter):
    """megatron-core warns when the CPU RNG moves inside its CUDA RNG fork: here the CUDA RNG *is*
    the CPU generator, so it always does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable(*, report: bool = False) -> None:
    """Turn the emulated accelerator on for the rest of this process (idempotent).

    Called by :func:`megatron_ift.platform.bootstrap` (``MEGATRON_IFT_EMULATE_CUDA=1``), which
    refuses it on a machine with a real CUDA device.

    Args:
        report: record each distinct violation once and go on (```MEGATRON_IFT_EMULATE_CUDA=report```)
            instead of raising at the first.

    Raises:
        RuntimeError: after :func:`megatron_ift.cpu_compat.enable` (the two are exclusive).
    """
    if _STATE.active:
        return
    if cpu_compat.is_enabled():
        raise RuntimeError("emulated_cuda.enable(): cpu_compat is already enabled in this process")
    cpu_compat.patch_cuda_runtime(current_device=lambda: 0)
    torch.cuda.is_available = lambda: True  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 1  # type: ignore[assignment]
    torch.cuda.set_device = lambda *_a, **_k: None  # type: ignore[assignment]
    torch.cuda.is_initialized = lambda: True  # type: ignore[assignment]
    torch.cuda._lazy_init = lambda: None  # type: ignore[assignment]
    torch.cuda.get_device_name = lambda *_a, **_k: "emulated CUDA device (CPU arithmetic)"  # type: ignore[assignment]
    # A Hopper (9.0): what the shipped GPU configs target, and the FP8 checks let it through.
    torch.cuda.get_device_capability = lambda *_a, **_k: (9, 0)  # type: ignore[assignment]
    torch.cuda.Event = _NullEvent  # type: ignore[assignment]
    torch.cuda.set_sync_debug_mode = lambda *_a, **_k: None  # type: ignore[assignment]
    _patch_distributed()
    _patch_parameter()
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_QuietRngFork())
    _PlacementMode().__enter__()
    _PlacementChecker().__enter__()
    _STATE.report = report
    _STATE.active = True
