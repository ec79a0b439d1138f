"""Which megatron-core fusions a run turns on: the ones its device has kernels for.

On the CPU every fusion is off: megatron-core's fused kernels are CUDA (or ``torch.compile``
for CUDA) code. On a CUDA device each fusion is on when what it needs is importable, so a GPU
without Transformer Engine or apex still gets the ``torch.compile``-d ones instead of failing:

==================================  ===========================================================
``bias_activation_fusion``           CUDA (megatron-core's jit-fused bias + GeLU / SwiGLU)
``bias_dropout_fusion``              CUDA (jit-fused bias + dropout + residual add)
``masked_softmax_fusion``            CUDA and megatron's ``scaled_*_softmax_cuda`` kernels
``apply_rope_fusion``                CUDA and Transformer Engine (its fused RoPE)
``gradient_accumulation_fusion``     CUDA and TE layers, or apex's ``fused_weight_gradient_mlp_cuda``
``persist_layer_norm``               off: apex's persistent LayerNorm; our norms are torch or TE
==================================  ===========================================================
"""

from __future__ import annotations

import importlib.util
from typing import Callable


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fusion_settings(
    device_type: str, transformer_impl: str, importable: Callable[[str], bool] = _importable
) -> dict[str, bool]:
    """``TransformerConfig`` fusion fields for a device and layer implementation.

    Args:
        device_type: ``cuda`` or ``cpu`` (the compute device's type).
        transformer_impl: the resolved layer spec, ``local`` or ``transformer_engine``.
        importable: module-availability probe (tests pass their own).

    Returns:
        The six fusion flags, ``cross_entropy_loss_fusion`` (off: the IFT loss is ours).
    """
    cuda = device_type == "cuda"
    te = cuda and transformer_impl == "transformer_engine"
    return {
        "bias_activation_fusion": cuda,
        "bias_dropout_fusion": cuda,
        "masked_softmax_fusion": cuda and importable("scaled_upper_triang_masked_softmax_cuda"),
        "apply_rope_fusion": te,
        "gradient_accumulation_fusion": te or (cuda and importable("fused_weight_gradient_mlp_cuda")),
        "persist_layer_norm": False,
        "cross_entropy_loss_fusion": False,
    }
