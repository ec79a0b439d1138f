"""ModelConfig: the architecture of a GPT/Llama-family model, independent of parallel layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, get_args

from megatron_ift.config_io import check_literals, from_dict
from megatron_ift.validation import ConfigError, check_positive_int, check_range

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = get_args(Dtype)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer (GPT / Llama / Mistral / Qwen2 family)."""

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Query heads."""
    vocab_size: int
    """True (tokenizer) vocabulary size; the embedding is padded beyond it (see below)."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention (None: multi-head attention)."""
    ffn_hidden_size: Optional[int] = None
    """MLP width (None: 4 * hidden_size)."""
    kv_channels: Optional[int] = None
    """Head dimension (None: hidden_size / num_attention_heads)."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times the tensor-parallel size."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is built for."""
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """``rope`` (Llama) or ``learned_absolute`` (GPT-2)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rotary_percent: float = 1.0
    """Fraction of the head dimension that is rotated."""
    rope_scaling: bool = False
    """Llama-3.1 style RoPE frequency scaling."""
    rope_scaling_factor: float = 8.0
    """Factor of the Llama-3.1 RoPE scaling."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """``RMSNorm`` or ``LayerNorm``."""
    norm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """``swiglu`` (gated SiLU, Llama) or ``gelu``."""
    add_bias_linear: bool = False
    """Biases on every linear layer (GPT-2 style)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2)."""
    tie_embeddings: bool = False
    """Share the input embedding and output layer weights."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention/MLP."""
    attention_dropout: float = 0.0
    """Dropout of the attention probabilities."""
    params_dtype: Dtype = "float32"
    """Parameter / compute dtype: float32, bfloat16 (mixed precision) or float16."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """``local`` (megatron-core modules), ``transformer_engine``, or ``auto`` (TE when usable)."""
    attention_backend: Literal["auto", "sdpa", "local"] = "auto"
    """Core attention of the local spec: ``sdpa`` (PyTorch's fused scaled-dot-product kernel,
    :mod:`megatron_ift.models.attention`), ``local`` (megatron-core's unfused
    ``DotProductAttention``), or ``auto`` (sdpa; Transformer Engine's own when its spec is used)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "make_vocab_size_divisible_by", "max_position_embeddings"):
            check_positive_int(f"model.{name}", getattr(self, name))
        for name in ("num_query_groups", "ffn_hidden_size", "kv_channels"):
            if getattr(self, name) is not None:
                check_positive_int(f"model.{name}", getattr(self, name))
        check_literals(self, "model")
        if self.transformer_impl == "transformer_engine" and self.attention_backend != "auto":
            raise ConfigError(
                f"model.attention_backend={self.attention_backend!r} applies to the local spec; "
                "with model.transformer_impl=transformer_engine leave it at 'auto'"
            )
        check_range("model.hidden_dropout", self.hidden_dropout, 0.0, 1.0, high_inclusive=False)
        check_range("model.attention_dropout", self.attention_dropout, 0.0, 1.0,
                    high_inclusive=False)
        check_range("model.rotary_percent", self.rotary_percent, 0.0, 1.0, low_inclusive=False)
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "model") -> "ModelConfig":
        """The one way to build a ModelConfig from a mapping: a ``model:`` section or the
        ``model`` entry a checkpoint records (:func:`megatron_ift.config_io.from_dict`).

        Args:
            data: ModelConfig fields.
            source: where ``data`` comes from, for messages (a checkpoint folder, say).

        Raises:
            ConfigError: one line naming an unknown key (e.g. recorded by a newer
                megatron-ift), a missing, mistyped or invalid one.
        """
        try:
            return from_dict(cls, data, "model")
        except ConfigError as exc:
            if source == "model":
                raise
            raise ConfigError(f"{source}: {exc}") from None

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def num_parameters(self) -> int:
        """Parameter count (unpadded vocabulary), for MFU and memory estimates."""
        h = self.hidden_size
        head = self.kv_channels or h // self.num_attention_heads
        q = self.num_attention_heads * head
        kv = 2 * self.query_groups * head
        ffn = self.ffn_hidden_size or 4 * h
        mlp = (3 if self.activation == "swiglu" else 2) * h * ffn
        attn = h * (q + kv) + q * h
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h
