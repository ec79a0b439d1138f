"""Build megatron-core ``GPTModel`` chunks from a :class:`ModelConfig` and a parallel layout.

Layer spec: megatron-core's Transformer Engine spec when the platform has TE and a (real or
emulated) CUDA device (``transformer_impl`` ``auto`` or ``transformer_engine``), else the local
spec with torch norms that support sequence parallelism (:mod:`megatron_ift.models.norm`).
The chunks are :class:`megatron_ift.models.ift_model.IFTGPTModel`: megatron-core's ``GPTModel``
with the two entry points the IFT step calls.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ift.models.attention import SDPAttention
from megatron_ift.models.config import ModelConfig
from megatron_ift.models.fusions import fusion_settings
from megatron_ift.models.ift_model import IFTGPTModel
from megatron_ift.models.norm import TorchNorm
from megatron_ift.parallel import ParallelConfig
from megatron_ift.platform import Platform
from megatron_ift.validation import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def te_available(platform: Platform) -> bool:
    """Transformer Engine importable and a CUDA device (real, or emulated with the test suite's
    TE stand-in) present."""
    return platform.cuda and platform.kernels.transformer_engine


def resolve_transformer_impl(model: ModelConfig, platform: Platform) -> str:
    """``local`` or ``transformer_engine``; raises when TE is asked for but unusable."""
    if model.transformer_impl == "auto":
        return "transformer_engine" if te_available(platform) else "local"
    if model.transformer_impl == "transformer_engine" and not te_available(platform):
        raise ConfigError(
            "model.transformer_impl='transformer_engine' needs a CUDA GPU and the "
            "transformer-engine package (pip install 'megatron-ift[gpu]'); use "
            "model.transformer_impl=local on CPU"
        )
    return model.transformer_impl


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    platform: Platform,
    *,
    use_cpu_initialization: Optional[bool] = None,
    **overrides: Any,
) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` for ``model`` split as ``parallel`` on ``platform``.

    Args:
        use_cpu_initialization: initialise full weights on the CPU then split them, which makes
            the initial weights independent of the tensor-parallel degree (default: on without
            a CUDA device).
        overrides: extra ``TransformerConfig`` fields (recomputation, FP8, ...).
    """
    parallel.check_model(model.num_layers, model.num_attention_heads, model.query_groups)
    dtype = _DTYPES[model.params_dtype]
    if use_cpu_initialization is None:
        use_cpu_initialization = not platform.cuda
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        kv_channels=model.kv_channels,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        attention_softmax_in_fp32=True,
        deallocate_pipeline_outputs=True,
        **fusion_settings(platform, resolve_transformer_impl(model, platform),
                          gated=model.activation == "swiglu", bias=model.add_bias_linear),
    )
    if parallel.context_parallel_size > 1 and resolve_transformer_impl(model, platform) == "local":
        kwargs["cp_comm_type"] = "all_gather"  # what SDPAttention's context parallelism does
    if dist.is_initialized() and dist.get_backend() == "gloo":
        # gloo matches point-to-point messages between two ranks in posting order; batched
        # p2p ops post "send to prev" before "send to next", which swaps activations and
        # gradients when prev == next (interleaved pipeline with PP = 2). Unbatched p2p orders
        # sends and receives by rank parity and is exact.
        kwargs["batch_p2p_comm"] = False
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(model: ModelConfig, config: TransformerConfig, platform: Platform,
               vp_stage: Optional[int], packed_rows: bool = False) -> ModuleSpec:
    """Block spec for this stage's layers.

    TE spec on GPU; otherwise the local spec with torch norms and, unless
    ``model.attention_backend`` is ``local``, fused SDPA core attention
    (:class:`megatron_ift.models.attention.SDPAttention`).

    Args:
        packed_rows: the rows are packed (a block mask per micro-batch); see
            :func:`local_layer_spec`.
    """
    if resolve_transformer_impl(model, platform) == "transformer_engine":
        if model.attention_backend != "auto":
            raise ConfigError(
                f"model.attention_backend={model.attention_backend!r} applies to the local spec; "
                "the Transformer Engine spec uses TE's fused attention (leave it at 'auto')"
            )
        return get_gpt_layer_with_transformer_engine_spec()
    layer = local_layer_spec(model, packed_rows)
    num = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num, layer_norm=TorchNorm),
    )


def local_layer_spec(model: ModelConfig, packed_rows: bool) -> ModuleSpec:
    """One transformer layer of the local spec: torch norms (sequence-parallel capable), SDPA
    core attention unless ``model.attention_backend`` is ``local``.

    With packed rows (a block mask per micro-batch), megatron-core's own core attention
    (``attention_backend: local``) declares an ``arbitrary`` mask: with the ``causal`` type its
    fused softmax takes the upper-triangular kernel, which never reads the mask, and packed
    samples would attend to each other.
    """
    layer = get_gpt_layer_local_spec(normalization=model.normalization)
    attention = layer.submodules.self_attention
    if model.attention_backend in ("auto", "sdpa"):
        attention.submodules.core_attention = SDPAttention
    elif packed_rows:
        attention.params = dict(attention.params, attn_mask_type=AttnMaskType.arbitrary)
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    return layer


def build_gpt_chunks(
    model: ModelConfig, parallel: ParallelConfig, platform: Platform,
    config: Optional[TransformerConfig] = None, *, packed_rows: bool = False,
) -> list[IFTGPTModel]:
    """This rank's model chunks (one, or ``virtual_pipeline_model_parallel_size`` with VPP), on
    the platform's device.

    Requires megatron-core's process groups (:func:`megatron_ift.distributed.init_distributed`).
    ``packed_rows``: see :func:`layer_spec`.
    """
    config = config or transformer_config(model, parallel, platform)
    tp = parallel.tensor_model_parallel_size
    chunks = []
    for vp in range(parallel.vpp):
        vp_stage = vp if parallel.virtual_pipeline_model_parallel_size else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = IFTGPTModel(
            config=config,
            transformer_layer_spec=layer_spec(model, config, platform, vp_stage, packed_rows),
            vocab_size=model.padded_vocab_size(tp),
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=model.position_embedding_type,
            rotary_percent=model.rotary_percent,
            rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=vp_stage,
        )
        if platform.cuda:
            # GPU allocation (as Megatron-LM's get_model): parameters and buffers built on the
            # host (CPU initialisation, our torch norms) move to this rank's device.
            chunk.to(platform.device)
        chunks.append(chunk)
    return chunks
