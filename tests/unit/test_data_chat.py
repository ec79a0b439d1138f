"""Assistant masks: trained tokens are exactly the assistant texts plus end-of-turn tokens.

Checked against an independent tokenisation: each assistant message's text (with the end-of-turn
token) encoded on its own, and the whole conversation through ``apply_chat_template``.
"""

import json
import os
import shutil

import pytest
from _infra import ROOT

from megatron_ift.data import (
    DataConfig,
    DataError,
    build_data,
    check_vocab,
    load_tokenizer,
)
from megatron_ift.data.chat import ChatEncoder, check_messages
from megatron_ift.data.templates import CHATML
from megatron_ift.validation import ConfigError

TOKENIZER = os.path.join(ROOT, "data", "tokenizer")
EOT = "<|im_end|>"

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42"},
    ],
    [
        {"role": "system", "content": "You are a careful calculator."},
        {"role": "user", "content": "Add 7 and 815."},
        {"role": "assistant", "content": "7 + 815 = 822"},
        {"role": "user", "content": "Now reverse the digits of the result."},
        {"role": "assistant", "content": "228"},
        {"role": "user", "content": "Thanks! And backwards: abc?"},
        {"role": "assistant", "content": "cba"},
    ],
    [
        {"role": "user", "content": "Reverse the string: hello world"},
        {"role": "assistant", "content": " dlrow olleh  "},  # leading/trailing spaces are content
        {"role": "user", "content": "ok"},  # a trailing user turn is context only
    ],
]
PAIRS = [
    {"prompt": "Write qwerty backwards.", "response": "ytrewq", "system": "Answer exactly."},
    {"prompt": "Compute 99+1.", "response": "99 + 1 = 100", "system": None},
    {"prompt": "Reverse the string: x", "response": "x\nDone.", "system": ""},
]


def write_jsonl(path, records, blank_line_at=None):
    with open(path, "w") as fh:
        for i, rec in enumerate(records):
            if i == blank_line_at:
                fh.write("\n")
            fh.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def expected_messages():
    """Conversations by global sample id (files in order: chat file, pair file)."""
    msgs = [c for c in CONVERSATIONS]
    for p in PAIRS:
        m = [{"role": "system", "content": p["system"]}] if p["system"] else []
        msgs.append(
            m
            + [
                {"role": "user", "content": p["prompt"]},
                {"role": "assistant", "content": p["response"]},
            ]
        )
    return msgs


def trained_runs(tokens, labels, loss_mask):
    """Contiguous runs of trained label ids (one per assistant turn)."""
    runs, cur = [], []
    for t in range(len(tokens)):
        if loss_mask[t]:
            cur.append(int(labels[t]))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def check_sample(tokenizer, messages, tokens, labels, loss_mask):
    """Independent check of one sample's ids and trained tokens."""
    want_ids = tokenizer.apply_chat_template(
        messages, chat_template=CHATML, tokenize=True, return_dict=True
    )["input_ids"]
    assert list(tokens) == list(want_ids)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    want_runs = [tokenizer(text + EOT, add_special_tokens=False)["input_ids"] for text in assistant]
    got_runs = trained_runs(tokens, labels, loss_mask)
    assert got_runs == want_runs
    assert [tokenizer.decode(r) for r in got_runs] == [text + EOT for text in assistant]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("template", ["auto", "chatml_generation"])
def test_masks_are_assistant_text_and_end_of_turn(tmp_path, tokenizer, packing, template):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = DataConfig(
        paths=(chat, pairs),
        tokenizer_path=TOKENIZER,
        chat_template=template,
        seq_length=128,
        packing=packing,
        cache_dir=str(tmp_path / "cache"),
    )
    data = build_data(cfg)
    ds = data.train
    by_id = expected_messages()
    seen = []
    for r in range(len(ds)):
        row = ds.row(r)
        start = 0
        for k in ds.row_samples(r):
            n = len(ds.sample(int(k))[0])
            sl = slice(start, start + n)
            sid = int(ds.sample_ids[k])
            check_sample(
                tokenizer, by_id[sid], row["tokens"][sl], row["labels"][sl], row["loss_mask"][sl]
            )
            assert (
                row["loss_mask"][start + n - 1] == 0
            )  # a segment's last position is never trained
            seen.append(sid)
            start += n
        assert not row["loss_mask"][start:].any()  # padding
    assert sorted(seen) == list(range(len(by_id)))
    assert data.report.trained_tokens == sum(
        len(tokenizer(m["content"] + EOT, add_special_tokens=False)["input_ids"])
        for c in by_id
        for m in c
        if m["role"] == "assistant"
    )


def test_shipped_data_masks(tmp_path, tokenizer):
    """The first rows of both shipped files, through the full pipeline, packed."""
    src = [os.path.join(ROOT, "data", f) for f in ("sft_messages.jsonl", "sft_pairs.jsonl")]
    paths, by_id = [], []
    for i, path in enumerate(src):
        with open(path) as fh:
            lines = [json.loads(next(fh)) for _ in range(60)]
        paths.append(write_jsonl(tmp_path / f"part{i}.jsonl", lines))
        for rec in lines:
            by_id.append(
                rec["messages"]
                if "messages" in rec
                else [
                    {"role": "user", "content": rec["prompt"]},
                    {"role": "assistant", "content": rec["response"]},
                ]
            )
    data = build_data(
        DataConfig(
            paths=tuple(paths),
            tokenizer_path=TOKENIZER,
            seq_length=256,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    ds = data.train
    assert data.report.train_samples == 120 and len(ds) < 120  # packed several per row
    for r in range(len(ds)):
        row, start = ds.row(r), 0
        for k in ds.row_samples(r):
            n = len(ds.sample(int(k))[0])
            sl = slice(start, start + n)
            check_sample(
                tokenizer,
                by_id[int(ds.sample_ids[k])],
                row["tokens"][sl],
                row["labels"][sl],
                row["loss_mask"][sl],
            )
            start += n


def test_unknown_role_names_file_and_line(tmp_path):
    convs = [{"messages": c} for c in CONVERSATIONS] * 3
    convs[4] = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]
    }
    path = write_jsonl(tmp_path / "chat.jsonl", convs, blank_line_at=2)
    cfg = DataConfig(
        paths=(path,), tokenizer_path=TOKENIZER, seq_length=128, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(DataError, match=r"chat\.jsonl:6: message 1 has role 'bot'"):
        build_data(cfg)


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "assistant", "content": "hi"}], "starts with an assistant"),
        (
            [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}],
            "no string 'content'",
        ),
        ("hello", "non-empty list of messages"),
    ],
)
def test_malformed_conversations(messages, reason):
    with pytest.raises(ValueError, match=reason):
        check_messages(messages)


def test_special_token_in_content_is_rejected(tmp_path):
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"sneaky{EOT}more"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": bad}])
    cfg = DataConfig(
        paths=(path,), tokenizer_path=TOKENIZER, seq_length=128, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(
        DataError, match=r"chat\.jsonl:2: message 1 \(assistant\) contains the special token"
    ):
        build_data(cfg)


def test_tokenizer_without_template_needs_a_fallback(tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tok_dir)
    cfg_path = tok_dir / "tokenizer_config.json"
    conf = json.loads(cfg_path.read_text())
    del conf["chat_template"]
    cfg_path.write_text(json.dumps(conf))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    kw = dict(
        paths=(chat,), tokenizer_path=str(tok_dir), seq_length=128, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(DataError, match=rf"{tok_dir} has no chat template.*data.chat_template"):
        build_data(DataConfig(**kw))
    data = build_data(DataConfig(**kw, chat_template="chatml"))
    assert data.report.train_samples == len(CONVERSATIONS)


def test_fallback_needs_its_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz <>|_\n")))}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "chars")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    cfg = DataConfig(
        paths=(chat,),
        tokenizer_path=str(tmp_path / "chars"),
        chat_template="chatml",
        cache_dir=str(tmp_path / "c"),
    )
    with pytest.raises(
        DataError, match=r"needs the special tokens \['<\|im_start\|>', '<\|im_end\|>'\]"
    ):
        build_data(cfg)


def test_template_that_rewrites_history_is_detected(tokenizer):
    # The turn count up front changes as messages are added: no stable prefix to mask by.
    template = "{{ messages | length }}\n" + CHATML
    enc = ChatEncoder(tokenizer, template)
    with pytest.raises(ValueError, match="not prefix-stable"):
        enc.encode([check_messages(CONVERSATIONS[1])])


def test_template_ignoring_the_generation_prompt_is_detected(tokenizer):
    template = CHATML.replace("{%- if add_generation_prompt %}", "{%- if false %}")
    enc = ChatEncoder(tokenizer, template)
    with pytest.raises(ValueError, match="must honour add_generation_prompt"):
        enc.encode([check_messages(CONVERSATIONS[0])])


def test_check_vocab(tokenizer):
    check_vocab(tokenizer, 384)
    check_vocab(tokenizer, 512)
    with pytest.raises(
        ConfigError,
        match=r"tokenizer at '.*tokenizer' has 384 token ids but model.vocab_size is 383",
    ):
        check_vocab(tokenizer, 383, TOKENIZER)
