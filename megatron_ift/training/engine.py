"""Model, DDP, optimizer and LR scheduler set-up on megatron-core, from our frozen configs."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ift.models.config import ModelConfig
from megatron_ift.models.gpt import build_gpt_chunks, transformer_config
from megatron_ift.parallel import ParallelConfig
from megatron_ift.platform import Platform
from megatron_ift.training.frozen_embedding import freeze_input_embedding
# OptimizerConfig lives with the other config sections (importing it needs no megatron-core);
# it is re-exported here for the callers that build an optimizer.
from megatron_ift.training.config import OptimizerConfig, warmup_steps  # noqa: F401


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    platform: Platform,
    *,
    mixing_embeddings: str = "live",
    transformer_overrides: Optional[dict[str, Any]] = None,
    packed_rows: bool = False,
) -> tuple[list[DistributedDataParallel], TransformerConfig]:
    """This rank's chunks wrapped in megatron-core DDP, and their ``TransformerConfig``.

    Args:
        platform: the compute device and kernels (layer spec, fusions).
        mixing_embeddings: ``IFTConfig.mixing_embeddings`` of the steps the model will run;
            ``detached`` freezes an untied input embedding
            (:mod:`megatron_ift.training.frozen_embedding`).
        transformer_overrides: extra ``TransformerConfig`` fields (recomputation, FP8).
        packed_rows: the data packs several samples per row (the attention's mask type,
            :func:`megatron_ift.models.gpt.layer_spec`).

    Returns:
        ``(chunks, config)``; ``config`` is wired for the step: losses are ``(sum, count)``
        (``calculate_per_token_loss``), gradients finalised once per step.
    """
    config = transformer_config(model, parallel, platform, **(transformer_overrides or {}))
    # Every loss function of the project returns (sum, count) (IFTStep's, and the SFT limit's):
    # the schedule must not rescale it, and finalize_model_grads divides the gradients by the
    # count summed over micro-batches and data-parallel ranks. Set here, once, for every step.
    config.calculate_per_token_loss = True
    chunks = build_gpt_chunks(model, parallel, platform, config, packed_rows=packed_rows)
    freeze_input_embedding(chunks, mixing_embeddings)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        bucket_size=None,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=c,
            # Only the first chunk's buckets overlap with compute in interleaved schedules.
            disable_bucketing=(i > 0),
        )
        for i, c in enumerate(chunks)
    ]
    for w in wrapped:
        w.broadcast_params()
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    # megatron-core runs it inside the schedule, once per step, after the last micro-batch; it
    # reads the global token count on the host (`if num_tokens > 0`), its one sync per step.
    config.finalize_model_grads_func = platform.once_per_step(finalize_model_grads)
    if parallel.overlap_grad_reduce:
        config.grad_sync_func = [w.start_grad_sync for w in wrapped]
        if len(wrapped) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    return wrapped, config


def build_optimizer(
    chunks: Sequence[DistributedDataParallel],
    optim: OptimizerConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    config: TransformerConfig,
):
    """megatron-core's optimizer (distributed when configured), wired for loss scaling."""
    mcfg = MegatronOptimizerConfig(
        optimizer=optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        sgd_momentum=optim.sgd_momentum,
        clip_grad=optim.clip_grad,
        bf16=model.params_dtype == "bfloat16",
        fp16=model.params_dtype == "float16",
        params_dtype=config.params_dtype,
        initial_loss_scale=optim.initial_loss_scale,
        loss_scale=optim.loss_scale,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(mcfg, list(chunks))
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer, optim: OptimizerConfig, total_steps: int) -> OptimizerParamScheduler:
    """Warm-up then cosine/linear/constant decay, stepped once per optimizer step."""
    warmup = warmup_steps(optim, total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        override_opt_param_scheduler=False,
        use_checkpoint_opt_param_scheduler=True,
    )
