"""Refusals that depend on the machine: what this platform cannot run, said before anything is
built (the configuration's own checks run when it is loaded, :mod:`megatron_ift.training.config`)."""

from __future__ import annotations

from megatron_ift.errors import ConfigError
from megatron_ift.models.fp8 import check_fp8_supported
from megatron_ift.models.gpt import resolve_transformer_impl
from megatron_ift.platform import Platform
from megatron_ift.training.config import RunConfig


def check_platform(cfg: RunConfig, platform: Platform) -> None:
    """Raise ConfigError (one line, naming the key and the fix) if ``cfg`` asks for NCCL, the
    Transformer Engine spec or FP8 where ``platform`` cannot run them, or for a combination the
    first GPU step would reject.

    Args:
        cfg: the run's config.
        platform: where this process computes (:func:`megatron_ift.platform.bootstrap`).
    """
    if cfg.parallel.backend == "nccl" and not platform.cuda:
        raise ConfigError(
            "parallel.backend=nccl needs CUDA GPUs and this machine has none; use "
            "parallel.backend=auto (gloo on CPU) or run on GPU nodes"
        )
    impl = resolve_transformer_impl(cfg.model, platform)  # raises if TE is asked for and missing
    if impl == "transformer_engine" and cfg.data.packing and cfg.train.micro_batch_size != 1:
        raise ConfigError(
            "data.packing=true with model.transformer_impl=transformer_engine sends packed rows "
            "to TE's fused attention as THD sequences, which needs train.micro_batch_size=1 "
            f"(got {cfg.train.micro_batch_size}); set it to 1 (gradient accumulation keeps the "
            "global batch) or model.transformer_impl=local"
        )
    if impl == "transformer_engine" and cfg.data.packing and cfg.parallel.context_parallel_size > 1:
        raise ConfigError(
            "data.packing=true with parallel.context_parallel_size > 1 on the Transformer Engine "
            "spec is not supported: TE splits each packed sequence (THD) over the ranks, our IFT "
            "step splits whole rows; set model.transformer_impl=local (SDPA attention, packed "
            "rows with a block mask) or data.packing=false"
        )
    if cfg.fp8.enabled:
        check_fp8_supported(cfg.fp8, platform)
        if impl != "transformer_engine":
            raise ConfigError("fp8.enabled=true needs model.transformer_impl=transformer_engine (or auto)")
