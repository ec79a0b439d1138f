"""Loading a local Hugging Face tokenizer and checking it against the model's vocabulary."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from megatron_ift.data.errors import DataError
from megatron_ift.validation import ConfigError


def load_tokenizer(path: str) -> Any:
    """A fast Hugging Face tokenizer from a local folder (never from the Hub).

    Args:
        path: folder with ``tokenizer.json`` / ``tokenizer_config.json``.

    Returns:
        A ``PreTrainedTokenizerFast`` (transformers' Rust-backed tokenizer): offsets mappings,
        which the assistant mask relies on, exist only for fast tokenizers.

    Raises:
        DataError: the folder is missing, unreadable, or holds a slow (Python) tokenizer.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"tokenizer folder {path!r} does not exist (data.tokenizer_path)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for broken folders
        raise DataError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
    if not getattr(tok, "is_fast", False):
        raise DataError(
            f"the tokenizer at {path!r} is a slow (Python) tokenizer; a fast one (tokenizer.json) "
            "is needed for character offsets"
        )
    return tok


def write_tokenizer_folder(
    tokenizer: Any,
    out_dir: str,
    *,
    chat_template: str,
    eos_token: str,
    pad_token: str,
    additional_special_tokens: list[str],
    unk_token: Optional[str] = None,
    model_max_length: int = 4096,
) -> str:
    """Save a ``tokenizers.Tokenizer`` as a folder that :func:`load_tokenizer` (and
    transformers 4.x and 5.x) load as a ``PreTrainedTokenizerFast`` with ``chat_template``.

    ``tokenizer_config.json`` is written by hand rather than by ``save_pretrained``, so the chat
    template stays inline and the output is byte-stable (sorted keys, ``\n`` line ends).

    Returns:
        ``out_dir``.
    """
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": pad_token,
        "additional_special_tokens": list(additional_special_tokens),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    if unk_token is not None:
        config["unk_token"] = unk_token
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return out_dir


def tokenizer_size(tokenizer: Any) -> int:
    """One more than the largest token id the tokenizer can produce (vocabulary + added tokens)."""
    ids = tokenizer.get_vocab().values()
    return max(len(tokenizer), (max(ids) + 1) if ids else 0)


def check_vocab(tokenizer: Any, model_vocab_size: int, tokenizer_path: str = "") -> None:
    """Raise if the tokenizer can emit ids the model's embedding does not have.

    Args:
        tokenizer: a Hugging Face tokenizer.
        model_vocab_size: the model's true (unpadded) vocabulary size, ``model.vocab_size``.
        tokenizer_path: the tokenizer's folder, for the message.

    Raises:
        ConfigError: the tokenizer's vocabulary exceeds ``model_vocab_size``.
    """
    size = tokenizer_size(tokenizer)
    if size > model_vocab_size:
        where = tokenizer_path or getattr(tokenizer, "name_or_path", "") or "<given>"
        raise ConfigError(
            f"the tokenizer at {where!r} has {size} token ids but model.vocab_size is "
            f"{model_vocab_size}; set model.vocab_size >= {size} or use the model's own tokenizer"
        )


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else end-of-sequence, else 0.

    Padding is never trained on (loss mask 0) and never attended to by real tokens, so any
    valid id works; a dedicated pad token keeps batches readable.
    """
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def megatron_tokenizer(path: str) -> Any:
    """megatron-core's wrapper of the same Hugging Face tokenizer, as its ``GPTDataset`` needs.

    ``GPTDatasetConfig`` reads ``vocab_size``, ``eod`` and ``pad`` from it and hashes its
    ``unique_identifiers`` into the dataset cache key.
    """
    from megatron.core.tokenizers import MegatronTokenizer

    if not os.path.isdir(path):
        raise DataError(f"tokenizer folder {path!r} does not exist (data.tokenizer_path)")
    return MegatronTokenizer.from_pretrained(
        tokenizer_path=path, metadata_path={"library": "huggingface", "model_type": "gpt"}
    )
