"""Which megatron-core fusions a run turns on: the ones its platform has kernels for.

One decision from the platform's facts (:class:`megatron_ift.platform.Platform`: a CUDA device,
real or emulated, and which optional kernels are importable), so the CPU suite can exercise the
decisions a GPU container makes (Transformer Engine with or without apex, neither) by building
the platform it describes. On the CPU every fusion is off: megatron-core's fused kernels are CUDA
(or ``torch.compile`` for CUDA) code.

==================================  ===========================================================
``bias_activation_fusion``           CUDA, when the MLP has biases or a gated activation
                                     (megatron-core refuses the bias-free GeLU fusion)
``bias_dropout_fusion``              CUDA (jit-fused bias + dropout + residual add)
``masked_softmax_fusion``            CUDA and megatron's ``scaled_*_softmax_cuda`` kernels
``apply_rope_fusion``                CUDA and Transformer Engine (its fused RoPE)
``gradient_accumulation_fusion``     CUDA and apex's ``fused_weight_gradient_mlp_cuda``: the
                                     output layer is always megatron-core's own
                                     ``ColumnParallelLinear``, which needs that kernel even when
                                     every other layer is Transformer Engine's
``persist_layer_norm``               off: apex's persistent LayerNorm; our norms are torch or TE
==================================  ===========================================================
"""

from __future__ import annotations

from megatron_ift.platform import Platform


def fusion_settings(platform: Platform, transformer_impl: str, *, gated: bool,
                    bias: bool) -> dict[str, bool]:
    """``TransformerConfig`` fusion fields for a platform and layer implementation.

    Args:
        platform: where the run computes and which kernels exist.
        transformer_impl: the resolved layer spec, ``local`` or ``transformer_engine``.
        gated: the MLP uses a gated activation (SwiGLU).
        bias: the linear layers have biases (``model.add_bias_linear``).

    Returns:
        The six fusion flags and ``cross_entropy_loss_fusion`` (off: the IFT loss is ours).
    """
    cuda = platform.cuda
    kernels = platform.kernels
    return {
        "bias_activation_fusion": cuda and (gated or bias),
        "bias_dropout_fusion": cuda,
        "masked_softmax_fusion": cuda and kernels.megatron_softmax,
        "apply_rope_fusion": cuda and transformer_impl == "transformer_engine" and kernels.transformer_engine,
        "gradient_accumulation_fusion": cuda and kernels.apex_gradient_accumulation,
        "persist_layer_norm": False,
        "cross_entropy_loss_fusion": False,
    }


def missing_kernel_warnings(platform: Platform, transformer_impl: str) -> list[str]:
    """One line per fusion a GPU run would use but has no kernel for (it runs unfused); empty
    on the CPU, where no fusion is expected."""
    if not platform.cuda:
        return []
    out = []
    if not platform.kernels.apex_gradient_accumulation:
        out.append("gradient_accumulation_fusion is off: apex's fused_weight_gradient_mlp_cuda is "
                   "not installed (megatron-core's output layer needs it even with Transformer "
                   "Engine); install NVIDIA apex with its CUDA extensions to fuse weight-gradient "
                   "accumulation")
    if transformer_impl == "local" and not platform.kernels.megatron_softmax:
        out.append("masked_softmax_fusion is off: megatron's scaled_*_softmax_cuda kernels are not "
                   "installed (only the local spec's model.attention_backend=local uses them)")
    return out
