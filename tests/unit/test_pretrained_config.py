"""The model architecture comes from ``checkpoint.pretrained``'s record (no real weights needed:
a checkpoint folder with only its ``megatron_ift.json`` is enough for the config checks)."""

import dataclasses

import pytest
import yaml

from megatron_ift.checkpoint.architecture import (
    ARCHITECTURE_FIELDS,
    RUNTIME_FIELDS,
    check_checkpoint_architecture,
)
from megatron_ift.checkpoint.layout import CheckpointError, mark_latest, write_metadata
from megatron_ift.models.config import ModelConfig
from megatron_ift.training.config import load_run_config
from megatron_ift.validation import ConfigError

RECORDED = ModelConfig(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=96, kv_channels=16, vocab_size=384, max_position_embeddings=512,
    rotary_base=100000.0, norm_epsilon=9.999999747378752e-06, tie_embeddings=True,
)


def _checkpoint(root, model=RECORDED, with_model=True):
    ckpt = root / "iter_0000000"
    ckpt.mkdir(parents=True)
    meta = {"step": 0}
    if with_model:
        meta["model"] = dataclasses.asdict(model)
    write_metadata(str(ckpt), meta)
    mark_latest(str(root), 0)
    return root


def _config(tmp_path, pretrained, model=None):
    data = {
        "data": {"paths": ["data/sft_messages.jsonl"], "tokenizer_path": "data/tokenizer",
                 "seq_length": 128},
        "checkpoint": {"dir": str(tmp_path / "run"), "pretrained": str(pretrained)},
    }
    if model is not None:
        data["model"] = model
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_every_model_field_is_classified():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not set(ARCHITECTURE_FIELDS) & set(RUNTIME_FIELDS)
    assert fields <= set(ARCHITECTURE_FIELDS) | set(RUNTIME_FIELDS), \
        "classify a new ModelConfig field as architecture or run-time"


def test_a_preset_without_model_keys_takes_the_recorded_architecture(tmp_path):
    ckpt = _checkpoint(tmp_path / "imported")
    cfg = load_run_config(_config(tmp_path, ckpt), ["model.params_dtype=bfloat16",
                                                    "model.hidden_dropout=0.1"])
    want = dataclasses.replace(RECORDED, params_dtype="bfloat16", hidden_dropout=0.1)
    assert cfg.model == want
    cfg.check_paths()  # the same architecture loads


def test_agreeing_keys_and_float32_rounded_values_are_accepted(tmp_path):
    ckpt = _checkpoint(tmp_path / "imported")
    model = {"hidden_size": 64, "norm_epsilon": 1.0e-5, "rotary_base": 100000,
             "max_position_embeddings": 256, "transformer_impl": "local"}
    cfg = load_run_config(_config(tmp_path, ckpt, model))
    assert cfg.model.max_position_embeddings == 256  # fewer positions: a run-time choice
    assert cfg.model.norm_epsilon == RECORDED.norm_epsilon


def test_contradicting_architecture_keys_are_refused_naming_each(tmp_path):
    ckpt = _checkpoint(tmp_path / "imported")
    model = {"hidden_size": 128, "rotary_base": 10000.0, "tie_embeddings": False,
             "max_position_embeddings": 1024}
    with pytest.raises(ConfigError) as err:
        load_run_config(_config(tmp_path, ckpt, model))
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("model.hidden_size: checkpoint has 64, config sets 128",
                 "model.rotary_base: checkpoint has 100000.0, config sets 10000.0",
                 "model.tie_embeddings: checkpoint has True, config sets False",
                 "model.max_position_embeddings: checkpoint has 512, config sets 1024"):
        assert part in msg


def test_a_checkpoint_without_a_recorded_architecture_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "old", with_model=False)
    with pytest.raises(ConfigError, match="records no model architecture.*import-hf"):
        load_run_config(_config(tmp_path, ckpt))


def test_a_missing_pretrained_path_without_model_keys_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist, and the model architecture is read"):
        load_run_config(_config(tmp_path, tmp_path / "nowhere"))


def test_loading_a_different_architecture_is_refused_whatever_the_shapes(tmp_path):
    """A rope base changes no tensor shape: without the check it would load silently."""
    ckpt = _checkpoint(tmp_path / "imported")
    other = dataclasses.replace(RECORDED, rotary_base=10000.0)
    with pytest.raises(CheckpointError, match="model.rotary_base: checkpoint has 100000.0"):
        check_checkpoint_architecture(str(ckpt / "iter_0000000"), other)
    check_checkpoint_architecture(str(ckpt / "iter_0000000"),
                                  dataclasses.replace(RECORDED, params_dtype="bfloat16"))
    # a full model: section written by hand (as older presets do) is checked at check_paths too
    path = _config(tmp_path, ckpt, dataclasses.asdict(other))
    with pytest.raises(ConfigError, match="rotary_base"):
        load_run_config(path)
