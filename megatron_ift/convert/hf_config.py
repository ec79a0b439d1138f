"""Hugging Face ``config.json`` <-> :class:`ModelConfig`.

Reads both the classic fields (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and the
transformers-5 ones (``rope_parameters``, ``dtype``); writes the style of the config it started
from (the classic one when there is none, which transformers 4 and 5 both read).

Refused, with the reason and the fix: architectures other than Llama / Mistral / Qwen2, RoPE
scaling other than Llama-3's (or Llama-3 scaling with constants megatron-core does not use),
sliding-window attention that would be active, biases megatron-core cannot place, activations
other than SiLU (SwiGLU) and partial rotary embeddings.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

from megatron_ift.convert import ConversionError
from megatron_ift.convert.arch import Architecture, get_architecture
from megatron_ift.models.config import DTYPES, ModelConfig
from megatron_ift.validation import ConfigError

# megatron-core 0.16 RotaryEmbedding._apply_scaling hard-codes these Llama-3 constants; only the
# factor is configurable (``rope_scaling_factor``).
LLAMA3_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}

# transformers' defaults for fields a config.json may omit.
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False},
}


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling parameters with ``rope_type``) from either config style."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    if not params:
        params = dict(legacy)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = hf.get("rope_theta", _DEFAULTS[hf["model_type"]]["rope_theta"])
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params["rope_type"] = rope_type
    return float(theta), params


def _dtype_name(hf: dict[str, Any]) -> Optional[str]:
    name = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(name, str):
        name = name.replace("torch.", "")
    return name


def model_config_from_hf(
    hf: dict[str, Any],
    *,
    make_vocab_size_divisible_by: int = 128,
    max_position_embeddings: Optional[int] = None,
    params_dtype: Optional[str] = None,
    transformer_impl: str = "auto",
) -> tuple[ModelConfig, Architecture]:
    """Our model config and architecture for an HF ``config.json`` (as a dict).

    Args:
        hf: the parsed ``config.json``.
        make_vocab_size_divisible_by: Megatron's vocabulary padding multiple (per TP rank).
        max_position_embeddings: override the HF value (e.g. at most a sliding window).
        params_dtype: ``float32`` / ``bfloat16`` / ``float16``; default: the HF ``dtype``.
        transformer_impl: recorded in the model config (``auto``, ``local``, ...).

    Returns:
        (ModelConfig, Architecture).

    Raises:
        ConversionError: an unsupported architecture or option (the message says which and why).
    """
    model_type = hf.get("model_type")
    if not model_type:
        raise ConversionError(
            "config.json has no 'model_type'; is this a Hugging Face model folder?"
        )
    arch = get_architecture(model_type)
    classes = hf.get("architectures") or [arch.hf_class]
    if arch.hf_class not in classes:
        raise ConversionError(
            f"config.json architectures={classes} is not the causal LM {arch.hf_class}; only "
            "causal-LM checkpoints can be converted (export the base model with its LM head)"
        )
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if hf.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks {missing}; the folder's config is incomplete")
    defaults = _DEFAULTS[arch.model_type]

    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise ConversionError(
            f"hidden_act={act!r}: only SiLU-gated MLPs (SwiGLU) are supported by this converter"
        )
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(
            f"partial_rotary_factor={hf['partial_rotary_factor']} is not supported; only full "
            "rotary embeddings convert exactly"
        )

    theta, scaling = _rope(hf)
    rope_scaling, rope_factor = False, 8.0
    if scaling["rope_type"] == "llama3":
        wrong = {k: scaling.get(k) for k, v in LLAMA3_CONSTANTS.items()
                 if not math.isclose(float(scaling.get(k, float("nan"))), v)}
        if wrong:
            raise ConversionError(
                f"llama3 rope scaling with {wrong}: megatron-core hard-codes "
                f"{LLAMA3_CONSTANTS} (RotaryEmbedding._apply_scaling), so the converted model "
                "would compute different rotary frequencies; only the factor may vary"
            )
        rope_scaling, rope_factor = True, float(scaling["factor"])
    elif scaling["rope_type"] != "default":
        raise ConversionError(
            f"rope scaling type {scaling['rope_type']!r} is not supported: megatron-core's "
            "GPTModel implements Llama-3 scaling ('llama3') only; convert a model without "
            "rope scaling or with rope_type 'llama3'"
        )

    max_pos = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
    if max_position_embeddings is not None:
        max_pos = max_position_embeddings
    window = _active_sliding_window(hf, arch)
    if window is not None and window < max_pos:
        raise ConversionError(
            f"{arch.model_type} uses sliding-window attention (sliding_window={window}) below "
            f"max_position_embeddings={max_pos}; megatron-ift trains with full attention, which "
            f"equals sliding-window attention only for sequences of at most {window} tokens. "
            f"Re-run with --max-position-embeddings {window} (or less) to convert it for such "
            "sequences"
        )

    add_qkv_bias = arch.name == "qwen2"
    if arch.name == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ConversionError(
            "Llama with attention_bias/mlp_bias=true is not supported: megatron-core has no "
            "option for biases on q/k/v/o without MLP biases (or the reverse)"
        )
    tie = hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])

    dtype = params_dtype or _dtype_name(hf) or "float32"
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {DTYPES}; pass --dtype")
    try:
        cfg = ModelConfig(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=hf["intermediate_size"],
            kv_channels=head_dim,
            vocab_size=hf["vocab_size"],
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            max_position_embeddings=max_pos,
            position_embedding_type="rope",
            rotary_base=theta,
            rope_scaling=rope_scaling,
            rope_scaling_factor=rope_factor,
            normalization="RMSNorm",
            norm_epsilon=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
            activation="swiglu",
            add_bias_linear=False,
            add_qkv_bias=add_qkv_bias,
            tie_embeddings=bool(tie),
            params_dtype=dtype,
            transformer_impl=transformer_impl,
        )
    except ConfigError as exc:
        raise ConversionError(f"config.json does not describe a valid model: {exc}") from exc
    return cfg, arch


def _active_sliding_window(hf: dict[str, Any], arch: Architecture) -> Optional[int]:
    if arch.name == "mistral":
        return hf.get("sliding_window")
    if arch.name == "qwen2" and hf.get("use_sliding_window"):
        return hf.get("sliding_window")
    return None


def hf_config_from_model(
    cfg: ModelConfig,
    arch: Architecture,
    *,
    dtype: str,
    base: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg``.

    Args:
        cfg: the model.
        arch: its HF architecture.
        dtype: the weights' dtype (``torch_dtype`` / ``dtype``).
        base: the original HF config (from the import), whose other fields (token ids, ...)
            are kept; the architecture fields are always rewritten from ``cfg``.

    Returns:
        The config dict.
    """
    if cfg.position_embedding_type != "rope" or cfg.normalization != "RMSNorm":
        raise ConversionError(
            f"{arch.hf_class} needs rope + RMSNorm; this checkpoint has "
            f"{cfg.position_embedding_type} + {cfg.normalization}"
        )
    if cfg.activation != "swiglu" or cfg.add_bias_linear:
        raise ConversionError(
            f"{arch.hf_class} needs a SwiGLU MLP without linear biases; this checkpoint has "
            f"activation={cfg.activation}, add_bias_linear={cfg.add_bias_linear}"
        )
    if cfg.add_qkv_bias != (arch.name == "qwen2"):
        raise ConversionError(
            f"add_qkv_bias={cfg.add_qkv_bias} does not fit {arch.hf_class}; "
            f"use --arch {'qwen2' if cfg.add_qkv_bias else 'llama'}"
        )
    if cfg.rotary_percent != 1.0:
        raise ConversionError(f"rotary_percent={cfg.rotary_percent}: HF {arch.hf_class} rotates "
                              "the whole head")
    head = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    out = copy.deepcopy(base) if base else {}
    for key in ("_name_or_path", "transformers_version", "auto_map"):
        out.pop(key, None)
    out.update(
        architectures=[arch.hf_class],
        model_type=arch.model_type,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        head_dim=head,
        hidden_act="silu",
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if arch.name == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if arch.name == "mistral" and not base:
        out["sliding_window"] = None
    if arch.name == "qwen2" and not base:
        out.update(use_sliding_window=False, sliding_window=None)

    scaling: Optional[dict[str, Any]] = None
    if cfg.rope_scaling:
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_CONSTANTS}
    if "rope_parameters" in out:  # transformers-5 style
        out["rope_parameters"] = {"rope_theta": cfg.rotary_base, "rope_type": "default",
                                  **(scaling or {})}
    else:
        out["rope_theta"] = cfg.rotary_base
        out["rope_scaling"] = scaling
    if "dtype" in out:
        out["dtype"] = dtype
    else:
        out["torch_dtype"] = dtype
    return out
