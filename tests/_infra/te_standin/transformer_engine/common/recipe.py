"""FP8 recipes (``transformer_engine.common.recipe``): the fields megatron-core sets."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Union

import torch


class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(enum.Enum):
    """FP8 formats: E4M3 for everything, HYBRID = E4M3 forward and E5M2 for gradients."""

    E4M3 = _FormatHelper(max_fwd=448.0, max_bwd=448.0)
    E5M2 = _FormatHelper(max_fwd=57344.0, max_bwd=57344.0)
    HYBRID = _FormatHelper(max_fwd=448.0, max_bwd=57344.0)

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self is Format.E5M2 else torch.float8_e4m3fn

    @property
    def backward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is Format.E4M3 else torch.float8_e5m2


def _ignore_extra(cls):
    """TE's recipes are pydantic dataclasses, which ignore unknown keyword arguments (megatron-core
    passes ``params_dtype`` and ``device`` to ``DelayedScaling``): the same here."""
    init = cls.__init__
    names = set(cls.__dataclass_fields__)

    def __init__(self, *args, **kwargs):
        init(self, *args, **{k: v for k, v in kwargs.items() if k in names})

    cls.__init__ = __init__
    return cls


class Recipe:
    """Base of the recipes."""

    def delayed(self) -> bool:
        return isinstance(self, DelayedScaling)

    def float8_current_scaling(self) -> bool:
        return isinstance(self, Float8CurrentScaling)

    def mxfp8(self) -> bool:
        return False

    def float8_block_scaling(self) -> bool:
        return False

    def nvfp4(self) -> bool:
        return False

    def custom(self) -> bool:
        return False


@_ignore_extra
@dataclass
class DelayedScaling(Recipe):
    """Per-tensor scales from an amax history (the history's max, or its latest entry):
    ``scale = fp8_max / amax / 2 ** margin``, the history updated after each use."""

    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: Union[str, Callable] = "max"
    override_linear_precision: tuple = (False, False, False)
    scaling_factor_compute_algo: Optional[Callable] = None
    reduce_amax: bool = True
    fp8_dpa: bool = False
    fp8_mha: bool = False

    def __post_init__(self) -> None:
        assert self.fp8_format != Format.E5M2, "Pure E5M2 training is not supported."
        if self.amax_compute_algo not in ("max", "most_recent") and not callable(self.amax_compute_algo):
            raise ValueError(f"amax_compute_algo={self.amax_compute_algo!r}: 'max' or 'most_recent'")


@_ignore_extra
@dataclass
class Float8CurrentScaling(Recipe):
    """Per-tensor scales from the tensor's own amax, computed at each cast."""

    fp8_format: Format = Format.HYBRID
    fp8_dpa: bool = False
    fp8_mha: bool = False
    use_power_2_scales: bool = False
    override_linear_precision: tuple = (False, False, False)

    def __post_init__(self) -> None:
        assert self.fp8_format != Format.E5M2, "Pure E5M2 training is not supported."


@_ignore_extra
@dataclass
class MXFP8BlockScaling(Recipe):
    """Not covered by the stand-in: refused when used."""

    fp8_format: Format = Format.E4M3

    def __post_init__(self) -> None:
        raise NotImplementedError("the Transformer Engine stand-in covers the delayed and current "
                                  "scaling recipes only (not MXFP8)")


@_ignore_extra
@dataclass
class Float8BlockScaling(Recipe):
    """Not covered by the stand-in: refused when used."""

    fp8_format: Format = Format.E4M3
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        raise NotImplementedError("the Transformer Engine stand-in covers the delayed and current "
                                  "scaling recipes only (not block scaling)")
