"""FP8 autocast and its global state (``transformer_engine.pytorch.fp8``), emulated.

A GEMM input cast to FP8 is emulated by quantize-dequantize: ``x * scale`` clamped to the
format's range, rounded through ``torch.float8_e4m3fn`` / ``float8_e5m2``, divided by the scale,
in the compute dtype (TE runs the GEMM on the FP8 data with the scales; the values it multiplies
are these). Gradients pass straight through the forward casts; the output gradient entering a
linear layer's backward is cast with the recipe's backward format (E5M2 for HYBRID).

Scales per recipe, as TE defines them:

* ``Float8CurrentScaling``: ``fp8_max / amax(x)`` of the tensor being cast.
* ``DelayedScaling``: from an amax history per tensor role of each module (input, weight,
  output gradient): ``fp8_max / amax_h / 2 ** margin``, ``amax_h`` the history's max
  (``amax_compute_algo="max"``) or latest entry (``"most_recent"``). A cast uses the scale
  computed from earlier iterations and records its own amax; at the end of the outermost
  ``fp8_autocast`` the recorded forward amaxes are all-reduced (max) over the autocast's
  ``fp8_group``, pushed into the histories and the scales recomputed (backward amaxes are
  pushed when recorded, per rank). The first use of a role has scale 1.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from transformer_engine.common.recipe import (
    DelayedScaling,
    Float8CurrentScaling,
    Format,
    Recipe,
)


class FP8GlobalStateManager:
    """What ``fp8_autocast`` switched on (class-level state, as in TE)."""

    FP8_ENABLED = False
    FP8_CALIBRATION = False
    FP8_RECIPE: Optional[Recipe] = None
    FP8_DISTRIBUTED_GROUP = None
    FP8_PARAMETERS = False
    IS_FIRST_FP8_MODULE = False
    FP8_GRAPH_CAPTURING = False
    FP8_AUTOCAST_DEPTH = 0
    _pending: list = []

    @classmethod
    def reset(cls) -> None:
        cls.FP8_ENABLED = False
        cls.FP8_CALIBRATION = False
        cls.FP8_RECIPE = None
        cls.FP8_DISTRIBUTED_GROUP = None
        cls.FP8_AUTOCAST_DEPTH = 0
        cls._pending = []

    @classmethod
    def is_fp8_available(cls) -> tuple[bool, str]:
        return check_fp8_support()

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.FP8_ENABLED

    @classmethod
    def is_fp8_calibration(cls) -> bool:
        return cls.FP8_CALIBRATION

    @classmethod
    def with_fp8_parameters(cls) -> bool:
        return cls.FP8_PARAMETERS

    @classmethod
    def fp8_graph_capturing(cls) -> bool:
        return cls.FP8_GRAPH_CAPTURING

    @classmethod
    def is_first_fp8_module(cls) -> bool:
        first, cls.IS_FIRST_FP8_MODULE = cls.IS_FIRST_FP8_MODULE, False
        return first

    @classmethod
    def get_fp8_recipe(cls) -> Recipe:
        return cls.FP8_RECIPE if cls.FP8_RECIPE is not None else get_default_fp8_recipe()

    @classmethod
    def get_fp8_group(cls):
        return cls.FP8_DISTRIBUTED_GROUP

    @classmethod
    def get_fp8_autocast_state(cls) -> tuple:
        return (cls.FP8_ENABLED, cls.FP8_CALIBRATION, cls.FP8_RECIPE, cls.FP8_DISTRIBUTED_GROUP,
                cls.IS_FIRST_FP8_MODULE, cls.FP8_GRAPH_CAPTURING)

    @classmethod
    def set_fp8_autocast_state(cls, state: tuple) -> None:
        (cls.FP8_ENABLED, cls.FP8_CALIBRATION, cls.FP8_RECIPE, cls.FP8_DISTRIBUTED_GROUP,
         cls.IS_FIRST_FP8_MODULE, cls.FP8_GRAPH_CAPTURING) = state

    @classmethod
    def record_forward_amax(cls, meta: "ScalingMeta", amax: torch.Tensor) -> None:
        cls._pending.append((meta, amax))

    @classmethod
    def reduce_and_update_fp8_tensors(cls, forward: bool = True) -> None:
        """End of the outermost autocast: reduce the recorded amaxes over the FP8 group and
        update the histories and scales."""
        pending, cls._pending = cls._pending, []
        if not pending:
            return
        amaxes = torch.stack([a.reshape(()) for _, a in pending])
        group = cls.FP8_DISTRIBUTED_GROUP
        recipe = cls.FP8_RECIPE
        if (group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
                and (not isinstance(recipe, DelayedScaling) or recipe.reduce_amax)):
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
        for (meta, _), amax in zip(pending, amaxes):
            meta.push(amax)


def get_default_fp8_recipe() -> Recipe:
    return DelayedScaling()


def check_fp8_support() -> tuple[bool, str]:
    """FP8 needs compute capability >= 8.9 (the emulated device reports a Hopper)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, "Device compute capability 8.9 or higher required for FP8 execution."
    return True, ""


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe: Optional[Recipe] = None,
                 fp8_group=None, _graph: bool = False) -> Iterator[None]:
    """Run TE modules in FP8 (``enabled``) with ``fp8_recipe`` inside this context."""
    if enabled:
        available, reason = check_fp8_support()
        assert available, reason
    recipe = fp8_recipe if fp8_recipe is not None else get_default_fp8_recipe()
    if enabled and not isinstance(recipe, (DelayedScaling, Float8CurrentScaling)):
        raise NotImplementedError(f"the Transformer Engine stand-in does not cover {type(recipe).__name__}")
    state = FP8GlobalStateManager.get_fp8_autocast_state()
    FP8GlobalStateManager.FP8_ENABLED = enabled
    FP8GlobalStateManager.FP8_CALIBRATION = calibrating
    FP8GlobalStateManager.FP8_RECIPE = recipe
    FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP = fp8_group
    FP8GlobalStateManager.IS_FIRST_FP8_MODULE = FP8GlobalStateManager.FP8_AUTOCAST_DEPTH == 0
    FP8GlobalStateManager.FP8_AUTOCAST_DEPTH += 1
    try:
        yield
    finally:
        FP8GlobalStateManager.FP8_AUTOCAST_DEPTH -= 1
        outermost = FP8GlobalStateManager.FP8_AUTOCAST_DEPTH == 0
        if enabled and outermost and isinstance(recipe, DelayedScaling):
            FP8GlobalStateManager.reduce_and_update_fp8_tensors(forward=True)
        FP8GlobalStateManager.set_fp8_autocast_state(state)


@contextlib.contextmanager
def fp8_model_init(enabled: bool = True, recipe: Optional[Recipe] = None,
                   preserve_high_precision_init_val: bool = False) -> Iterator[None]:
    """FP8 weights (``fp8_param``) are not covered by the stand-in."""
    if enabled:
        raise NotImplementedError("the Transformer Engine stand-in keeps weights in high precision: "
                                  "fp8_model_init (megatron's fp8_param / fp8.param_gather) is not covered")
    yield


class ScalingMeta:
    """The delayed-scaling state of one tensor role of one module: amax history and scale."""

    def __init__(self) -> None:
        self.history: list[torch.Tensor] = []
        self.scale: Optional[torch.Tensor] = None
        self.fp8_max = 0.0
        self.recipe: Optional[DelayedScaling] = None

    def push(self, amax: torch.Tensor) -> None:
        recipe = self.recipe
        self.history.append(amax.detach().float().reshape(()))
        del self.history[:-recipe.amax_history_len]
        if recipe.amax_compute_algo == "most_recent":
            ref = self.history[-1]
        elif callable(recipe.amax_compute_algo):
            ref = recipe.amax_compute_algo(torch.stack(self.history))
        else:
            ref = torch.stack(self.history).max()
        scale = self.fp8_max / ref / (2.0 ** recipe.margin)
        # TE keeps the previous scale where amax is 0 or the scale not finite
        prev = self.scale if self.scale is not None else torch.ones_like(scale)
        self.scale = torch.where((ref > 0) & torch.isfinite(scale), scale, prev)


def _qdq(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    y = (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype).float() / scale
    return y.to(x.dtype)


class _ForwardCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, dtype, fp8_max):
        return _qdq(x, scale, dtype, fp8_max)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None  # straight through


class _GradCast(torch.autograd.Function):
    """Identity forward; the gradient is cast to the backward format."""

    @staticmethod
    def forward(ctx, x, meta, recipe):
        ctx.meta, ctx.recipe = meta, recipe
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        recipe, meta = ctx.recipe, ctx.meta
        fmt: Format = recipe.fp8_format
        fp8_max = fmt.value.max_bwd
        amax = grad.detach().abs().max().float()
        if isinstance(recipe, Float8CurrentScaling):
            scale = torch.where(amax > 0, fp8_max / amax, torch.ones_like(amax))
        else:
            meta.fp8_max, meta.recipe = fp8_max, recipe
            scale = meta.scale if meta.scale is not None else torch.ones_like(amax)
            meta.push(amax)  # backward amaxes: per rank, when recorded
        return _qdq(grad, scale, fmt.backward_dtype, fp8_max), None, None


def cast_forward(x: torch.Tensor, meta: ScalingMeta) -> torch.Tensor:
    """``x`` through the current recipe's forward FP8 format (quantize-dequantize)."""
    recipe = FP8GlobalStateManager.get_fp8_recipe()
    fp8_max = recipe.fp8_format.value.max_fwd
    dtype = recipe.fp8_format.forward_dtype
    amax = x.detach().abs().max().float()
    if isinstance(recipe, Float8CurrentScaling):
        scale = torch.where(amax > 0, fp8_max / amax, torch.ones_like(amax))
    else:
        meta.fp8_max, meta.recipe = fp8_max, recipe
        scale = meta.scale if meta.scale is not None else torch.ones_like(amax)
        FP8GlobalStateManager.record_forward_amax(meta, amax)
    return _ForwardCast.apply(x, scale, dtype, fp8_max)


def cast_gradient(x: torch.Tensor, meta: ScalingMeta) -> torch.Tensor:
    """Identity; in the backward the gradient reaching ``x`` is cast to the backward format."""
    return _GradCast.apply(x, meta, FP8GlobalStateManager.get_fp8_recipe())


def assert_dim_for_fp8_exec(*tensors: torch.Tensor) -> None:
    """TE's rule for an FP8 GEMM: the leading dimensions multiply to a multiple of 8, the last
    dimension is a multiple of 16."""
    for t in tensors:
        lead = 1
        for d in t.shape[:-1]:
            lead *= d
        assert lead % 8 == 0 and t.shape[-1] % 16 == 0, (
            "FP8 execution requires the product of all dimensions except the last to be divisible"
            f" by 8 and the last dimension to be divisible by 16, but got tensor with dims={list(t.size())}")
