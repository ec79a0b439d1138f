"""FP8 training through Transformer Engine: configuration, megatron-core mapping, support check.

FP8 GEMMs need Transformer Engine (TE) layers and a GPU with FP8 tensor cores (compute
capability >= 8.9: Ada, Hopper, Blackwell). Nothing here imports TE at module load: CPU runs and
tests never need it, and :func:`check_fp8_supported` imports it only when FP8 is requested.

Usage::

    fp8 = FP8Config(enabled=True, recipe="tensorwise", first_last_layers_bf16=True)
    check_fp8_supported(fp8)                      # clear error on an unsuitable machine
    config = transformer_config(model, parallel, **fp8_transformer_config_kwargs(fp8))

No FP8 run has been made on a GPU in this project yet (docs/scale_out.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_ift.config_io import check_literals
from megatron_ift.platform import Platform
from megatron_ift.validation import ConfigError, check_positive_int

MIN_COMPUTE_CAPABILITY = (8, 9)
#: Transformer Engine release that added per-tensor current scaling (Float8CurrentScaling).
MIN_TE_FOR_TENSORWISE = (2, 2)


class FP8UnsupportedError(ConfigError):
    """FP8 was requested on a machine that cannot run it; the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class FP8Config:
    """FP8 settings of a run (the ``fp8:`` section of a training config)."""

    enabled: bool = False
    """Run the transformer layers' GEMMs in FP8 (needs TE and compute capability >= 8.9)."""
    recipe: Literal["delayed", "tensorwise"] = "tensorwise"
    """Scaling recipe. ``tensorwise``: per-tensor *current* scaling, each scale computed from the
    tensor being cast (no history to warm up, robust to the shifts of fine-tuning, required to
    keep the first/last layers in bf16). ``delayed``: scales from an amax history of past steps
    (cheaper, the TE 1.x default)."""
    format: Literal["e4m3", "hybrid"] = "hybrid"
    """``hybrid``: e4m3 for activations and weights, e5m2 (more range) for gradients;
    ``e4m3``: e4m3 everywhere."""
    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layers in bf16 (they are the most sensitive to
    quantisation); needs ``recipe: tensorwise`` (megatron-core rejects it with delayed scaling)."""
    num_layers_at_start_in_bf16: int = 1
    """Layers at the start kept in bf16 when ``first_last_layers_bf16`` (at most the layers of one
    pipeline stage; megatron-core checks)."""
    num_layers_at_end_in_bf16: int = 1
    """Layers at the end kept in bf16 when ``first_last_layers_bf16``."""
    amax_history_len: int = 1024
    """Delayed scaling: steps of amax history per tensor."""
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: ``max`` over the history (safer) or ``most_recent``."""
    margin: int = 0
    """Scale margin: scales are divided by 2**margin for headroom against overflow."""
    wgrad: bool = True
    """Compute weight gradients in FP8 too (False: in higher precision)."""
    param_gather: bool = False
    """Keep the weights themselves in FP8 (``fp8_param``): halves weight memory and the
    distributed optimizer's all-gather; the fp32 master weights stay."""

    def __post_init__(self) -> None:
        check_literals(self, "fp8")
        check_positive_int("fp8.num_layers_at_start_in_bf16", self.num_layers_at_start_in_bf16,
                           allow_zero=True)
        check_positive_int("fp8.num_layers_at_end_in_bf16", self.num_layers_at_end_in_bf16,
                           allow_zero=True)
        check_positive_int("fp8.amax_history_len", self.amax_history_len)
        check_positive_int("fp8.margin", self.margin, allow_zero=True)
        if self.first_last_layers_bf16 and self.recipe == "delayed":
            raise ConfigError(
                "fp8.first_last_layers_bf16=true needs fp8.recipe=tensorwise (megatron-core "
                "does not support bf16 first/last layers with delayed scaling)")
        if self.param_gather and not self.enabled:
            raise ConfigError("fp8.param_gather=true needs fp8.enabled=true")


def fp8_transformer_config_kwargs(cfg: FP8Config) -> dict[str, Any]:
    """megatron-core 0.16.1 ``TransformerConfig`` fields for ``cfg``.

    Returns:
        ``{"fp8": None}`` when FP8 is off; otherwise ``fp8`` (the format), ``fp8_recipe``,
        the amax, margin and wgrad settings, ``fp8_param`` and the bf16 first/last-layer fields.
    """
    if not cfg.enabled:
        return {"fp8": None}
    return {
        "fp8": cfg.format,
        "fp8_recipe": cfg.recipe,
        "fp8_margin": cfg.margin,
        "fp8_amax_history_len": cfg.amax_history_len,
        "fp8_amax_compute_algo": cfg.amax_compute_algo,
        "fp8_wgrad": cfg.wgrad,
        "fp8_param": cfg.param_gather,
        "first_last_layers_bf16": cfg.first_last_layers_bf16,
        "num_layers_at_start_in_bf16": cfg.num_layers_at_start_in_bf16,
        "num_layers_at_end_in_bf16": cfg.num_layers_at_end_in_bf16,
    }


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_fp8_supported(cfg: FP8Config, platform: Platform) -> None:
    """Raise :class:`FP8UnsupportedError` naming the fix when ``cfg`` asks for FP8 here in vain.

    Checks, in order: Transformer Engine importable; a CUDA GPU visible; its compute capability
    >= 8.9; TE new enough for the recipe; TE's own FP8 verdict (driver, CUDA, cuBLASLt).
    Does nothing when FP8 is disabled.

    Args:
        cfg: the FP8 options.
        platform: where this process computes.
    """
    if not cfg.enabled:
        return
    off = "or set fp8.enabled=false to train in bf16"
    if not platform.kernels.transformer_engine:
        raise FP8UnsupportedError(
            "fp8.enabled=true needs NVIDIA Transformer Engine, which is not installed: "
            f"pip install 'megatron-ift[gpu]' (transformer-engine[pytorch]) on a CUDA machine, {off}")
    if not platform.cuda:
        raise FP8UnsupportedError(
            f"fp8.enabled=true needs a CUDA GPU and none is visible: run on an Ada, Hopper or "
            f"Blackwell GPU (compute capability >= 8.9), {off}")
    capability = torch.cuda.get_device_capability(platform.device)
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        name = torch.cuda.get_device_name(platform.device)
        raise FP8UnsupportedError(
            f"fp8.enabled=true: {name} has compute capability {capability[0]}.{capability[1]}, "
            f"FP8 tensor cores need >= 8.9 (L4/L40, H100/H200, B200): run there, {off}")
    import transformer_engine  # lazy on purpose: only FP8 runs need TE

    version = getattr(transformer_engine, "__version__", "0")
    if cfg.recipe == "tensorwise" and _version_tuple(version) < MIN_TE_FOR_TENSORWISE:
        raise FP8UnsupportedError(
            f"fp8.recipe=tensorwise (current scaling) needs Transformer Engine >= "
            f"{'.'.join(map(str, MIN_TE_FOR_TENSORWISE))}, found {version}: upgrade "
            "transformer-engine, or set fp8.recipe=delayed")
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except ImportError:  # moved in some TE releases: the capability check above stands
        return
    available, reason = check_fp8_support()
    if not available:
        raise FP8UnsupportedError(f"Transformer Engine reports FP8 unavailable: {reason}; {off}")
