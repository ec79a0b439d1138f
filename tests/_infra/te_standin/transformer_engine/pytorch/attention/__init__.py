"""``transformer_engine.pytorch.attention``: ``DotProductAttention`` and the fused RoPE."""

from transformer_engine.pytorch.attention.dot_product_attention import (
    DotProductAttention,  # noqa: F401
)
from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb  # noqa: F401
