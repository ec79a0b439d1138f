"""Torch LayerNorm / RMSNorm usable with sequence parallelism.

megatron-core's local spec builds ``WrappedTorchNorm`` (when apex is absent), which refuses
``sequence_parallel``. Under sequence parallelism a norm's weight sees only ``s/tp`` tokens per
rank, so its gradient must be all-reduced over the tensor-parallel group; megatron-core does that
for every parameter tagged ``sequence_parallel = True`` (``finalize_model_grads``). The fused
norms tag their parameters; this module does the same for the plain torch norms.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class TorchNorm:
    """Factory with the ``(config, hidden_size, eps)`` signature megatron-core's specs expect."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(
                f"normalization={config.normalization!r} is not supported by the local spec; "
                "use 'LayerNorm' or 'RMSNorm'"
            )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
