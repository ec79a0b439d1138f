"""The shipped demo data: small, exact answers, a tokenizer with a chat template, regenerable."""

import filecmp
import json
import os

from _infra import ROOT

from megatron_ift.data import demo, load_tokenizer

DATA = os.path.join(ROOT, "data")


def read_jsonl(name):
    with open(os.path.join(DATA, name)) as fh:
        return [json.loads(line) for line in fh]


def test_sizes_and_counts():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DATA) for f in fs)
    assert total < 2 * 1024 * 1024
    assert len(read_jsonl(demo.MESSAGES_FILE)) == demo.NUM_CONVERSATIONS
    assert len(read_jsonl(demo.PAIRS_FILE)) == demo.NUM_PAIRS
    assert len(read_jsonl(demo.TEXT_FILE)) == demo.NUM_TEXT_LINES


def test_every_answer_is_exact():
    chats = read_jsonl(demo.MESSAGES_FILE)
    assert all(demo.verify_conversation(r["messages"]) for r in chats)
    tasks = {r["task"] for r in chats}
    assert tasks == {"add", "reverse", "add_then_add", "add_then_reverse"}
    assert any(m["role"] == "system" for r in chats for m in r["messages"])
    pairs = read_jsonl(demo.PAIRS_FILE)
    assert all(
        demo.verify_conversation(
            [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["response"]},
            ]
        )
        for p in pairs
    )
    # The checker does catch a wrong answer.
    bad = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 5"},
    ]
    assert not demo.verify_conversation(bad)


def test_tokenizer():
    tok = load_tokenizer(os.path.join(DATA, demo.TOKENIZER_DIR))
    assert len(tok) == demo.VOCAB_SIZE <= 512
    with open(os.path.join(DATA, demo.TOKENIZER_DIR, "tokenizer_config.json")) as fh:
        assert "<|im_start|>" in json.load(fh)["chat_template"]
    for special in demo.SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    ids = tok("1234 + 98", add_special_tokens=False)["input_ids"]
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("123498")  # one token per digit
    text = "Reverse the string: naïve ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte fallback


def test_regeneration_is_byte_identical(tmp_path):
    written = demo.make_demo_data(str(tmp_path))
    assert len(written) == 5
    for path in written:
        rel = os.path.relpath(path, tmp_path)
        assert filecmp.cmp(path, os.path.join(DATA, rel), shallow=False), rel
