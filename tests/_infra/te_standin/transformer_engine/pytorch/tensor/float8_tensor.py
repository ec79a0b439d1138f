"""``Float8Tensor`` (no instances in the stand-in)."""

from transformer_engine.pytorch.tensor import QuantizedTensor


class Float8Tensor(QuantizedTensor):
    pass
