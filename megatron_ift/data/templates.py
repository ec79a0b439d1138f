"""Chat templates: the tokenizer's own, a named fallback, or a literal Jinja string.

The fallback ``chatml`` is the ChatML layout used by Qwen and many others::

    <|im_start|>user\\nWhat is 2 + 2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n

Its end-of-turn token ``<|im_end|>`` must be a single (special) token of the tokenizer: with it
split into pieces the model could not learn where a turn ends. ``chatml_generation`` is the same
layout with ``{% generation %}`` markers, for which transformers returns the assistant-token mask
itself (``return_assistant_tokens_mask``).
"""

from __future__ import annotations

from typing import Any

from megatron_ift.data.errors import DataError

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHATML_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Named fallbacks and the special tokens each needs as single tokens of the vocabulary.
FALLBACK_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>")),
    "chatml_generation": (CHATML_GENERATION, ("<|im_start|>", "<|im_end|>")),
}

AUTO = "auto"


def is_literal_template(value: str) -> bool:
    """Whether a ``chat_template`` setting is Jinja source rather than a name."""
    return "{{" in value or "{%" in value


def resolve_chat_template(tokenizer: Any, choice: str, tokenizer_path: str = "") -> str:
    """The Jinja chat template to render conversations with.

    Args:
        tokenizer: a Hugging Face tokenizer.
        choice: ``auto`` (the tokenizer's own template), a name in :data:`FALLBACK_TEMPLATES`,
            or literal Jinja source.
        tokenizer_path: the tokenizer's folder, for error messages.

    Returns:
        The template source.

    Raises:
        DataError: ``auto`` with a tokenizer that has no template, an unknown name, or a fallback
            whose special tokens are not single tokens of this tokenizer.
    """
    if choice == AUTO:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: take the default one
            template = template.get("default")
        if not template:
            raise DataError(
                f"the tokenizer at {tokenizer_path or '<given>'} has no chat template "
                "(no 'chat_template' in its tokenizer_config.json or chat_template.jinja) and "
                f"data.chat_template is 'auto'; set data.chat_template to a fallback "
                f"({', '.join(sorted(FALLBACK_TEMPLATES))}) or to a Jinja template"
            )
        return template
    if is_literal_template(choice):
        return choice
    if choice not in FALLBACK_TEMPLATES:
        raise DataError(
            f"data.chat_template={choice!r} is not 'auto', a known fallback "
            f"({', '.join(sorted(FALLBACK_TEMPLATES))}) or a Jinja template"
        )
    template, needed = FALLBACK_TEMPLATES[choice]
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in needed if tok not in vocab]
    if missing:
        raise DataError(
            f"data.chat_template={choice!r} needs the special tokens {missing} in the tokenizer at "
            f"{tokenizer_path or '<given>'}, which does not have them as single tokens"
        )
    return template


def uses_generation_markers(template: str) -> bool:
    """Whether the template marks assistant text with ``{% generation %}`` blocks."""
    return "generation %}" in template and "endgeneration" in template
