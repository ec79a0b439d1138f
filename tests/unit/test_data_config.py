"""DataConfig validation: every bad value fails at construction, naming the field."""

import dataclasses

import pytest

from megatron_ift.data.config import DataConfig
from megatron_ift.validation import ConfigError

BASE = dict(paths=("data/sft_messages.jsonl",), tokenizer_path="data/tokenizer")


def test_defaults_and_normalisation():
    cfg = DataConfig(paths="data/sft_messages.jsonl", tokenizer_path="data/tokenizer")
    assert cfg.paths == ("data/sft_messages.jsonl",)
    assert (cfg.format, cfg.truncation, cfg.chat_template, cfg.packing) == (
        "sft",
        "drop",
        "auto",
        True,
    )
    assert cfg.column("messages") == "messages"
    assert (
        DataConfig(**BASE, columns={"messages": "conversations"}).column("messages")
        == "conversations"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seq_length = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        DataConfig("data/x.jsonl")  # keyword-only


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(format="text"), "data.format"),
        (dict(paths=()), "data.paths"),
        (dict(tokenizer_path=""), "data.tokenizer_path"),
        (dict(seq_length=0), "data.seq_length"),
        (dict(seq_length=1), "data.seq_length"),
        (dict(truncation="cut"), "data.truncation"),
        (dict(num_proc=0), "data.num_proc"),
        (dict(eval_fraction=1.0), "data.eval_fraction"),
        (dict(eval_fraction=-0.1), "data.eval_fraction"),
        (dict(packing="yes"), "data.packing"),
        (dict(seed=-1), "data.seed"),
        (dict(chat_template="llama9"), "data.chat_template"),
        (dict(columns={"question": "q"}), "data.columns"),
        (dict(columns={"messages": ""}), "data.columns.messages"),
        (dict(weights=(1.0,)), "data.weights"),  # sft data has no blend
        (dict(format="pretrain", weights=(1.0, 2.0)), "data.weights"),
        (dict(format="pretrain", weights=(0.0,)), "data.weights[0]"),
        (dict(cache_dir=""), "data.cache_dir"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        DataConfig(**{**BASE, **overrides})


def test_literal_template_and_pretrain_blend_accepted():
    cfg = DataConfig(**BASE, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert cfg.chat_template.startswith("{%")
    blend = DataConfig(format="pretrain", paths=["a", "b"], weights=[0.3, 0.7], tokenizer_path="t")
    assert blend.paths == ("a", "b") and blend.weights == (0.3, 0.7)
