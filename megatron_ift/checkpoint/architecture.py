"""The model architecture a checkpoint records, and the checks against it.

Every megatron-ift checkpoint (``megatron-ift convert import-hf`` output or a training run's
``iter_*``) records its :class:`~megatron_ift.models.config.ModelConfig` in
``megatron_ift.json``. A run that starts from one (``checkpoint.pretrained``) takes the
architecture from that record, so a preset needs no ``model:`` section; the user may set only
run-time keys there (dtype, implementation, dropout, ...). Architecture keys that are set and
disagree are refused before any model is built, naming each key and both values: a different
rope base, norm epsilon or scaling changes no tensor shape and would otherwise load silently
into a different function.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from megatron_ift.checkpoint.layout import CheckpointError, read_metadata, resolve
from megatron_ift.models.config import ModelConfig
from megatron_ift.validation import ConfigError

ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "position_embedding_type",
    "rotary_base", "rotary_percent", "rope_scaling", "rope_scaling_factor", "normalization",
    "norm_epsilon", "activation", "add_bias_linear", "add_qkv_bias", "tie_embeddings",
)
"""Fields that define the function a checkpoint's weights compute: taken from the record."""

RUNTIME_FIELDS = (
    "max_position_embeddings", "init_method_std", "hidden_dropout", "attention_dropout",
    "params_dtype", "transformer_impl", "attention_backend",
)
"""Fields a run may choose freely (``max_position_embeddings`` up to the recorded value with
rope; it is the learned table's size with absolute positions, so then it must match)."""

# float fields whose recorded value went through float32 (e.g. GGUF rms eps 9.9999997e-06):
# compared to this relative tolerance, so a YAML "1e-5" is the same architecture.
_FLOAT_RTOL = 1e-6


def effective(cfg: Mapping[str, Any], key: str) -> Any:
    """The value ``key`` stands for, with ``None`` defaults resolved (``num_query_groups``
    None means as many groups as heads, and so on), so equal models compare equal."""
    value = cfg.get(key, _DEFAULTS.get(key))
    if value is not None:
        return value
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    if key == "num_query_groups":
        return heads
    if key == "ffn_hidden_size":
        return 4 * hidden
    if key == "kv_channels":
        return hidden // heads
    return value


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)
             if f.default is not dataclasses.MISSING}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=_FLOAT_RTOL)
        except (TypeError, ValueError):
            return False
    return a == b


def mismatches(recorded: Mapping[str, Any], chosen: Mapping[str, Any],
               keys: Any = None) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, chosen value)`` for each architecture key that differs.

    Args:
        recorded: the checkpoint's model config (dict).
        chosen: a model config (dict), complete or only the keys a user set.
        keys: which keys to compare (default: the architecture keys present in ``chosen``).

    Returns:
        The differing keys, in :data:`ARCHITECTURE_FIELDS` order.
    """
    keys = [k for k in ARCHITECTURE_FIELDS if k in chosen] if keys is None else keys
    full = {**recorded, **chosen}
    out = []
    for key in keys:
        if key == "rope_scaling_factor" and not (effective(recorded, "rope_scaling")
                                                 or effective(full, "rope_scaling")):
            continue  # the factor of a scaling that is off on both sides computes nothing
        a, b = effective(recorded, key), effective(full, key)
        if not _same(a, b):
            out.append((key, a, b))
    positions = chosen.get("max_position_embeddings")
    limit = recorded.get("max_position_embeddings")
    if positions is not None and limit is not None:
        rope = effective(recorded, "position_embedding_type") == "rope"
        if (positions > limit) if rope else (positions != limit):
            out.append(("max_position_embeddings", limit, positions))
    return out


def describe(found: list[tuple[str, Any, Any]]) -> str:
    """``model.key: checkpoint has A, config sets B; ...``."""
    return "; ".join(f"model.{k}: checkpoint has {a!r}, config sets {b!r}" for k, a, b in found)


def recorded_model(path: str) -> tuple[str, dict[str, Any]]:
    """The checkpoint folder ``path`` designates and the model config it records.

    Args:
        path: an ``iter_*`` folder or a folder with a ``latest`` file.

    Returns:
        (checkpoint folder, model config dict).

    Raises:
        CheckpointError: no checkpoint there, or no recorded model architecture.
    """
    ckpt = resolve(path) if os.path.isdir(path) else None
    if ckpt is None:
        raise CheckpointError(
            f"{path} is not a checkpoint (an iter_* folder with megatron_ift.json, or a folder "
            "whose 'latest' names one); use the output of `megatron-ift convert import-hf` "
            "or a run directory"
        )
    model = read_metadata(ckpt).get("model")
    if not isinstance(model, dict) or not model:
        raise CheckpointError(
            f"{ckpt}/megatron_ift.json records no model architecture ('model' entry); re-create "
            "the checkpoint with `megatron-ift convert import-hf`, or add a 'model' entry (the "
            "ModelConfig fields) to that file"
        )
    return ckpt, model


def model_section_from_checkpoint(pretrained: str, user: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model:`` section of a run that starts from ``pretrained``.

    Args:
        pretrained: the ``checkpoint.pretrained`` path.
        user: the keys the config sets under ``model:`` (possibly none).

    Returns:
        The recorded model config with the user's run-time keys applied (unknown keys are kept,
        for the config loader to refuse by name).

    Raises:
        ConfigError: the checkpoint records no architecture, or a set architecture key
            disagrees with it (every such key is named with both values).
    """
    try:
        ckpt, recorded = recorded_model(pretrained)
    except CheckpointError as exc:
        raise ConfigError(f"checkpoint.pretrained: {exc}") from exc
    found = mismatches(recorded, user)
    if found:
        raise ConfigError(
            f"the model: section contradicts checkpoint.pretrained={pretrained} ({ckpt}) - "
            f"{describe(found)}. The architecture comes from the checkpoint: remove these "
            "keys (only run-time keys such as params_dtype, transformer_impl or dropout may be "
            "set)"
        )
    # one path from a dict to a ModelConfig: a key this version does not know is refused by name
    ModelConfig.from_dict(recorded, source=f"checkpoint.pretrained={pretrained} ({ckpt})")
    merged = dict(recorded)
    # agreeing architecture keys keep the recorded value (a YAML 1e-5 is the record's float32
    # 9.9999997e-06): the model is exactly the checkpoint's
    merged.update({k: v for k, v in user.items() if k not in ARCHITECTURE_FIELDS})
    return merged


def check_checkpoint_architecture(ckpt_dir: str, cfg: ModelConfig) -> None:
    """Refuse to load ``ckpt_dir`` into a model built from ``cfg`` when the architectures differ.

    Raises:
        CheckpointError: the checkpoint records no architecture, or one that differs from
            ``cfg`` (each key named with both values), whatever the tensor shapes.
    """
    _, recorded = recorded_model(ckpt_dir)
    found = mismatches(recorded, dataclasses.asdict(cfg), keys=ARCHITECTURE_FIELDS)
    if found:
        raise CheckpointError(
            f"{ckpt_dir} holds another model architecture than the one configured - "
            f"{describe(found)}; use the checkpoint's values (leave model: keys unset with "
            "checkpoint.pretrained) or another checkpoint"
        )
