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
        check_thd_context_parallel(cfg)
    if cfg.fp8.enabled:
        check_fp8_supported(cfg.fp8, platform)
        if impl != "transformer_engine":
            raise ConfigError("fp8.enabled=true needs model.transformer_impl=transformer_engine (or auto)")


def check_thd_context_parallel(cfg: RunConfig) -> None:
    """Packed rows (THD) with context parallelism on the Transformer Engine spec: TE splits every
    packed segment into ``2 x cp`` chunks, so every segment must be padded to a multiple of that.
    The SFT packer does it (to ``lcm(data.segment_multiple, 2 x cp)``,
    :func:`megatron_ift.data.packing.thd_segment_multiple`, which divides ``data.seq_length`` since
    both do); packed pretraining documents run on unpadded. Raise ConfigError (one line, naming
    the keys) for a layout that cannot be split."""
    cp, data = cfg.parallel.context_parallel_size, cfg.data
    if data.format != "sft":
        raise ConfigError(
            f"data.format={data.format} with data.packing=true, parallel.context_parallel_size={cp} "
            "and model.transformer_impl=transformer_engine: TE's THD context parallelism splits "
            f"every packed document into 2 x {cp} chunks and pretraining documents are not padded "
            "to a multiple of that; set data.packing=false or model.transformer_impl=local")
