"""Conversations to token ids with an assistant mask: which tokens the model is trained to produce.

Two ways to find the assistant tokens, chosen from the template:

* ``{% generation %}`` markers: transformers' ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` returns the mask itself.
* any other template: **prefix renders**. For assistant message ``k`` the text rendered for
  ``messages[:k]`` with the generation prompt is a prefix of the text rendered for
  ``messages[:k + 1]``; what the latter adds is the assistant turn as the template writes it. The
  trained span is that addition up to and including its last special token (the end-of-turn
  token, e.g. ``<|im_end|>``), so inter-turn whitespace after it is not trained. The conversation
  is tokenised once, as a whole (exactly the ids ``apply_chat_template`` gives at inference), and
  a token is an assistant token when its first character lies in a trained span.

A template that rewrites earlier turns when later ones are added (not prefix-stable) is detected
and reported, rather than silently mis-masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from megatron_ift.data.templates import uses_generation_markers

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Encoded:
    """One tokenised conversation."""

    input_ids: list[int]
    """Token ids of the rendered conversation."""
    assistant_mask: list[int]
    """1 for tokens the model is trained to produce (assistant text and end-of-turn), else 0."""


def check_messages(
    messages: Any, role_key: str = "role", content_key: str = "content"
) -> list[dict]:
    """Validate one conversation and return it as ``[{"role", "content"}]`` dicts.

    Raises:
        ValueError: with the reason (the caller adds the file and row): not a list of messages,
            an unknown role, non-string content, or no assistant message to train on.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {j} is a {type(msg).__name__}, not an object")
        role, content = msg.get(role_key), msg.get(content_key)
        if role not in ROLES:
            raise ValueError(
                f"message {j} has role {role!r}; expected one of {', '.join(ROLES)} "
                f"(key {role_key!r})"
            )
        if not isinstance(content, str):
            raise ValueError(f"message {j} ({role}) has no string {content_key!r}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("the conversation has no assistant message to train on")
    if out[0]["role"] == "assistant":
        raise ValueError("the conversation starts with an assistant message (no prompt)")
    return out


class ChatEncoder:
    """Renders conversations with a chat template and tokenises them with an assistant mask.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        template: Jinja chat-template source (see :mod:`megatron_ift.data.templates`).
    """

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.generation_markers = uses_generation_markers(template)
        # Special-token strings: they delimit turns in the rendered text, and must never be
        # smuggled in through message content (the tokenizer would parse them as control tokens).
        specials = set(tokenizer.all_special_tokens)
        specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        self.special_tokens = sorted(specials, key=len, reverse=True)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages``."""
        return self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _check_content(self, messages: Sequence[dict]) -> None:
        for j, msg in enumerate(messages):
            for tok in self.special_tokens:
                if tok in msg["content"]:
                    raise ValueError(
                        f"message {j} ({msg['role']}) contains the special token {tok!r} "
                        "in its text"
                    )

    def assistant_spans(self, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of the trained assistant text within ``text``.

        Raises:
            ValueError: the template is not prefix-stable for this conversation.
        """
        spans = []
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            upto = self.render(messages[: k + 1])
            if not upto.startswith(before) or not text.startswith(upto):
                raise ValueError(
                    f"the chat template is not prefix-stable at assistant message {k} (rendering "
                    "more messages changes earlier text), so its tokens cannot be located; use a "
                    "template with {% generation %} markers"
                )
            turn = upto[len(before) :]
            header = next((tok for tok in self.special_tokens if turn.startswith(tok)), None)
            if header is not None:
                # The generation prompt did not cover the assistant header (the template ignores
                # add_generation_prompt), so the header's control tokens would be trained.
                raise ValueError(
                    f"assistant message {k} starts with the control token {header!r} after the "
                    "generation prompt: the chat template must honour add_generation_prompt"
                )
            end = len(turn)
            last = max(
                ((turn.rfind(tok), tok) for tok in self.special_tokens),
                key=lambda p: p[0],
                default=(-1, ""),
            )
            if last[0] >= 0:
                end = last[0] + len(last[1])  # up to and including the end-of-turn token
            spans.append((len(before), len(before) + end))
        return spans

    def encode(self, conversations: Sequence[Sequence[dict]]) -> list[Encoded]:
        """Tokenise validated conversations (from :func:`check_messages`).

        Raises:
            ValueError: a message contains a special-token string, or the template is not
                prefix-stable (the caller adds the file and row).
        """
        for messages in conversations:
            self._check_content(messages)
        if self.generation_markers:
            return [self._encode_generation(m) for m in conversations]
        texts = [self.render(m) for m in conversations]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for messages, text, ids, offsets in zip(
            conversations, texts, enc["input_ids"], enc["offset_mapping"]
        ):
            starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
            mask = np.zeros(len(ids), dtype=bool)
            for s, e in self.assistant_spans(messages, text):
                mask |= (starts >= s) & (starts < e)
            out.append(Encoded(input_ids=list(ids), assistant_mask=mask.astype(np.int8).tolist()))
        return out

    def _encode_generation(self, messages: Sequence[dict]) -> Encoded:
        enc = self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return Encoded(
            input_ids=list(enc["input_ids"]), assistant_mask=list(enc["assistant_masks"])
        )
