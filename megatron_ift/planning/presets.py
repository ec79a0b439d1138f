"""Model architectures the planner knows by name (published Llama-3 shapes, bf16 training)."""

from __future__ import annotations

from megatron_ift.models.config import ModelConfig
from megatron_ift.validation import ConfigError

_LLAMA3 = dict(
    vocab_size=128256,
    num_query_groups=8,
    max_position_embeddings=8192,
    rotary_base=500000.0,
    normalization="RMSNorm",
    activation="swiglu",
    params_dtype="bfloat16",
)

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                             ffn_hidden_size=14336, **_LLAMA3),
    "llama3-70b": ModelConfig(num_layers=80, hidden_size=8192, num_attention_heads=64,
                              ffn_hidden_size=28672, **_LLAMA3),
}


def get_preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a named preset (``llama3-8b``, ``llama3-70b``).

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
