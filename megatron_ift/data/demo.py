"""The shipped demo data: generated instruction tasks with exact answers, and a tiny tokenizer.

Everything is a pure function of a seed, so ``tools/make_demo_data.py`` regenerates ``data/``
byte for byte. Tasks (answers are exact and checked by :func:`verify_conversation`):

* ``add``: multi-digit addition, ``What is 482 + 1937?`` -> ``482 + 1937 = 2419``;
* ``reverse``: string reversal, ``Reverse the string: abcde`` -> ``edcba``;
* two-turn follow-ups: add, then add a third number or reverse the digits of the sum.

The tokenizer is a byte-level BPE (``tokenizers``) of :data:`VOCAB_SIZE` ids, digits split
individually (so arithmetic is learnable by a tiny model), with ChatML special tokens and the
ChatML template in its ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Iterable, Iterator

from megatron_ift.data.templates import CHATML
from megatron_ift.data.tokenizer import write_tokenizer_folder

SEED = 20240518
VOCAB_SIZE = 384
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
NUM_CONVERSATIONS = 3000
NUM_PAIRS = 1000
NUM_TEXT_LINES = 2000

MESSAGES_FILE = "sft_messages.jsonl"
PAIRS_FILE = "sft_pairs.jsonl"
TEXT_FILE = "pretrain_text.jsonl"
TOKENIZER_DIR = "tokenizer"

SYSTEM_PROMPTS = (
    "You are a precise assistant. Answer with the exact result.",
    "You are a careful calculator.",
)
_ADD_PROMPTS = ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a}+{b}.")
_REVERSE_PROMPTS = ("Reverse the string: {s}", "Write {s} backwards.")
_MORE_PROMPT = "Now add {c} to that."
_DIGITS_PROMPT = "Now reverse the digits of the result."

_ADD_RE = re.compile(r"^(?:What is (\d+) \+ (\d+)\?|Add (\d+) and (\d+)\.|Compute (\d+)\+(\d+)\.)$")
_REVERSE_RE = re.compile(r"^(?:Reverse the string: ([a-z]+)|Write ([a-z]+) backwards\.)$")
_MORE_RE = re.compile(r"^Now add (\d+) to that\.$")


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, 4)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))


def _add_turn(rng: random.Random) -> tuple[str, str, int]:
    a, b = _number(rng), _number(rng)
    return rng.choice(_ADD_PROMPTS).format(a=a, b=b), f"{a} + {b} = {a + b}", a + b


def _reverse_turn(rng: random.Random) -> tuple[str, str]:
    s = _word(rng)
    return rng.choice(_REVERSE_PROMPTS).format(s=s), s[::-1]


def conversation(rng: random.Random) -> dict:
    """One chat record ``{"messages": [...], "task": name}``: one or two user/assistant turns."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    kind = rng.random()
    if kind < 0.45:
        task = "add"
        q, a, _ = _add_turn(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    elif kind < 0.8:
        task = "reverse"
        q, a = _reverse_turn(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    else:
        q, a, total = _add_turn(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.5:
            task = "add_then_add"
            c = _number(rng)
            messages += [
                {"role": "user", "content": _MORE_PROMPT.format(c=c)},
                {"role": "assistant", "content": f"{total} + {c} = {total + c}"},
            ]
        else:
            task = "add_then_reverse"
            messages += [
                {"role": "user", "content": _DIGITS_PROMPT},
                {"role": "assistant", "content": str(total)[::-1]},
            ]
    return {"messages": messages, "task": task}


def pair(rng: random.Random) -> dict:
    """One prompt/response record ``{"prompt", "response", "task"}`` (single turn)."""
    if rng.random() < 0.5:
        q, a, _ = _add_turn(rng)
        return {"prompt": q, "response": a, "task": "add"}
    q, a = _reverse_turn(rng)
    return {"prompt": q, "response": a, "task": "reverse"}


def text_line(rng: random.Random) -> dict:
    """One raw-text record ``{"text": ...}`` for the pretraining-continuation demo."""
    if rng.random() < 0.5:
        a, b = _number(rng), _number(rng)
        return {"text": f"The sum of {a} and {b} is {a + b}."}
    s = _word(rng)
    return {"text": f"Reversed, {s} reads {s[::-1]}."}


def expected_reply(question: str, previous_total: int | None) -> tuple[str, int | None]:
    """The exact assistant reply to ``question`` and the running total it leaves.

    Raises:
        ValueError: the question is not one of the generated task forms.
    """
    m = _ADD_RE.match(question)
    if m:
        a, b = (int(g) for g in m.groups() if g is not None)
        return f"{a} + {b} = {a + b}", a + b
    m = _REVERSE_RE.match(question)
    if m:
        s = next(g for g in m.groups() if g is not None)
        return s[::-1], None
    m = _MORE_RE.match(question)
    if m and previous_total is not None:
        c = int(m.group(1))
        return f"{previous_total} + {c} = {previous_total + c}", previous_total + c
    if question == _DIGITS_PROMPT and previous_total is not None:
        return str(previous_total)[::-1], None
    raise ValueError(f"not a generated task: {question!r}")


def verify_conversation(messages: list[dict]) -> bool:
    """Whether every assistant reply is the exact answer to the user turn before it."""
    total = None
    question = None
    for msg in messages:
        if msg["role"] == "user":
            question = msg["content"]
        elif msg["role"] == "assistant":
            want, total = expected_reply(question, total)
            if msg["content"] != want:
                return False
    return True


def _write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def _training_texts(
    conversations: list[dict], pairs: list[dict], lines: list[dict]
) -> Iterator[str]:
    from jinja2 import Template

    template = Template(CHATML)
    for rec in conversations:
        yield template.render(messages=rec["messages"], add_generation_prompt=False)
    for rec in pairs:
        msgs = [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["response"]},
        ]
        yield template.render(messages=msgs, add_generation_prompt=False)
    for rec in lines:
        yield rec["text"]


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = VOCAB_SIZE) -> None:
    """Train the byte-level BPE tokenizer and save it as a transformers tokenizer folder.

    Args:
        texts: training texts (chat-rendered conversations and raw text).
        out_dir: folder to write ``tokenizer.json`` and ``tokenizer_config.json`` into.
        vocab_size: total ids including the 256 byte symbols and the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Digits one by one: a tiny model learns carries far more easily than multi-digit tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    write_tokenizer_folder(
        tok, out_dir, chat_template=CHATML, eos_token="<|endoftext|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def make_demo_data(out_dir: str, seed: int = SEED) -> list[str]:
    """Write the demo datasets and tokenizer into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    conversations = [conversation(rng) for _ in range(NUM_CONVERSATIONS)]
    pairs = [pair(rng) for _ in range(NUM_PAIRS)]
    lines = [text_line(rng) for _ in range(NUM_TEXT_LINES)]
    paths = [os.path.join(out_dir, name) for name in (MESSAGES_FILE, PAIRS_FILE, TEXT_FILE)]
    for path, records in zip(paths, (conversations, pairs, lines)):
        _write_jsonl(path, records)
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    train_tokenizer(_training_texts(conversations, pairs, lines), tok_dir)
    return paths + [os.path.join(tok_dir, f) for f in sorted(os.listdir(tok_dir))]
