"""``transformer_engine.pytorch.tensor``: the quantized tensor classes megatron-core checks
with ``isinstance``. The stand-in never makes one (its FP8 is quantize-dequantize in the
compute dtype; FP8 parameters are not covered)."""

import torch


class QuantizedTensor(torch.Tensor):
    """Base class of TE's quantized tensors (no instances in the stand-in)."""
