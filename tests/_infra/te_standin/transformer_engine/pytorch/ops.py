"""``transformer_engine.pytorch.ops`` (fusible operations): megatron-core names them in
annotations and in its fused MLP (``use_te_activation_func`` / ``use_te_fused_mlp``), which the
stand-in does not cover: every class is refused when built."""


class FusibleOperation:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"the Transformer Engine stand-in does not cover te.pytorch.ops."
                                  f"{type(self).__name__}")


class Sequential(FusibleOperation):
    pass


class BasicLinear(FusibleOperation):
    pass


class Bias(FusibleOperation):
    pass


class LayerNorm(FusibleOperation):
    pass


class RMSNorm(FusibleOperation):
    pass


class AllReduce(FusibleOperation):
    pass


class ReduceScatter(FusibleOperation):
    pass


class AllGather(FusibleOperation):
    pass


class GELU(FusibleOperation):
    pass


class GEGLU(FusibleOperation):
    pass


class ReLU(FusibleOperation):
    pass


class ReGLU(FusibleOperation):
    pass


class SiLU(FusibleOperation):
    pass


class SwiGLU(FusibleOperation):
    pass
