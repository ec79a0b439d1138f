"""``transformer_engine.pytorch.optimizers``: ``FusedAdam``, ``FusedSGD`` and the multi-tensor
helpers megatron-core imports (``multi_tensor_applier``, ``multi_tensor_l2norm``,
``multi_tensor_scale``), in plain PyTorch."""

from __future__ import annotations

import torch

from transformer_engine.pytorch.optimizers.fused_adam import FusedAdam  # noqa: F401
from transformer_engine.pytorch.optimizers.multi_tensor import (  # noqa: F401
    multi_tensor_applier,
    multi_tensor_l2norm,
    multi_tensor_scale,
)


class FusedSGD(torch.optim.SGD):
    """``FusedSGD``: torch's SGD (the fused kernel's arithmetic)."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, **kwargs):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)
