"""SFT pipeline: file formats, columns, truncation policy, held-out split, caching, errors."""

import json
import os

import numpy as np
import pytest
from _infra import ROOT

from megatron_ift.data import DataConfig, DataError, build_data

TOKENIZER = os.path.join(ROOT, "data", "tokenizer")


def conversation(i, turns=1):
    msgs = []
    for t in range(turns):
        msgs += [
            {"role": "user", "content": f"What is {i} + {t}?"},
            {"role": "assistant", "content": f"{i} + {t} = {i + t}"},
        ]
    return msgs


def write_jsonl(path, records):
    with open(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return str(path)


def rows_of(data):
    """All (sample id, tokens) of the train split, unpacked."""
    ds = data.train
    return {int(ds.sample_ids[k]): tuple(ds.sample(k)[0].tolist()) for k in range(len(ds.members))}


def cfg(tmp_path, paths, **kw):
    kw.setdefault("seq_length", 64)
    return DataConfig(
        paths=tuple(map(str, paths)),
        tokenizer_path=TOKENIZER,
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )


def test_file_formats_give_identical_samples(tmp_path):
    import datasets

    records = [{"messages": conversation(i, 1 + i % 2)} for i in range(12)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    ds = datasets.Dataset.from_list(records)
    (tmp_path / "a.json").write_text(json.dumps(records))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = [f for f in os.listdir(tmp_path / "saved") if f.endswith(".arrow")][0]
    os.replace(tmp_path / "saved" / arrow, tmp_path / "a.arrow")
    ds.save_to_disk(str(tmp_path / "saved2"))
    ref = rows_of(build_data(cfg(tmp_path, [jsonl], packing=False)))
    assert len(ref) == 12
    for path in ("a.json", "a.parquet", "a.arrow", "saved2"):
        assert rows_of(build_data(cfg(tmp_path, [tmp_path / path], packing=False))) == ref, path


def test_column_overrides(tmp_path):
    recs = [
        {"conversations": [{"from": m["role"], "value": m["content"]} for m in conversation(i)]}
        for i in range(4)
    ]
    pairs = [{"question": f"What is {i} + 0?", "answer": f"{i} + 0 = {i}"} for i in range(4)]
    a = write_jsonl(tmp_path / "a.jsonl", recs)
    b = write_jsonl(tmp_path / "b.jsonl", pairs)
    columns = {
        "messages": "conversations",
        "role": "from",
        "content": "value",
        "prompt": "question",
        "response": "answer",
    }
    got = rows_of(build_data(cfg(tmp_path, [a, b], columns=columns, packing=False)))
    ref = rows_of(
        build_data(
            cfg(
                tmp_path,
                [
                    write_jsonl(
                        tmp_path / "r.jsonl", [{"messages": conversation(i)} for i in range(4)]
                    )
                ],
                packing=False,
            )
        )
    )
    assert [got[i] for i in range(4)] == [ref[i] for i in range(4)]
    assert [got[4 + i] for i in range(4)] == [
        ref[i] for i in range(4)
    ]  # the pair file's rows follow


def test_truncation_policy_is_applied_and_reported(tmp_path):
    records = [{"messages": conversation(i, turns=1 if i % 3 else 6)} for i in range(30)]
    records.append(
        {
            "messages": [
                {"role": "user", "content": "x " * 200},
                {"role": "assistant", "content": "y"},
            ]
        }
    )
    path = write_jsonl(tmp_path / "a.jsonl", records)
    long = [i for i in range(30) if i % 3 == 0]
    dropped = build_data(cfg(tmp_path, [path], truncation="drop"))
    rep = dropped.report
    assert (rep.rows, rep.dropped_too_long, rep.truncated, rep.dropped_no_answer) == (
        31,
        len(long) + 1,
        0,
        0,
    )
    assert set(rows_of(dropped)) == set(range(30)) - set(long)
    assert rep.longest > 64 and "dropped 11 too long" in rep.summary()

    cut = build_data(cfg(tmp_path, [path], truncation="truncate"))
    rep = cut.report
    # The 200-word prompt fills all 64 tokens: nothing left to train, so it is dropped as such.
    assert (rep.truncated, rep.dropped_too_long, rep.dropped_no_answer) == (len(long), 0, 1)
    rows = rows_of(cut)
    assert set(rows) == set(range(30))
    assert all(len(rows[i]) == 64 for i in long)
    # A truncated sample is the head of the full one.
    full = rows_of(build_data(cfg(tmp_path, [path], seq_length=512)))
    assert all(rows[i] == full[i][:64] for i in long)


def test_eval_split_is_disjoint_seeded_and_stable(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": conversation(i)} for i in range(200)])

    def split(**kw):
        data = build_data(cfg(tmp_path, [path], eval_fraction=0.1, **kw))
        return set(data.train.sample_ids.tolist()), set(data.eval.sample_ids.tolist()), data

    train, held, data = split()
    assert len(held) == 20 and len(train) == 180 and not train & held
    assert data.report.eval_samples == 20 and data.report.eval_rows == len(data.eval)
    assert split()[1] == held  # deterministic
    assert split(seq_length=128)[1] == held  # independent of row layout
    assert split(seed=7)[1] != held


def test_tokenisation_is_cached_and_parallel_results_match(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"messages": conversation(i, 1 + i % 3)} for i in range(300)]
    )
    first = build_data(cfg(tmp_path, [path], num_proc=1))
    cache = tmp_path / "cache" / "sft"
    files = sorted(os.listdir(cache))
    assert any(f.startswith("tokenized-") for f in files)
    again = build_data(cfg(tmp_path, [path], num_proc=1))
    assert sorted(os.listdir(cache)) == files  # reused, nothing re-tokenised
    # A fresh cache, so the two worker processes really tokenise (one shard each).
    parallel = build_data(cfg(tmp_path / "p", [path], num_proc=2))
    assert sum("_of_00002" in f for f in os.listdir(tmp_path / "p" / "cache" / "sft")) == 2
    assert rows_of(first) == rows_of(again) == rows_of(parallel)
    for r in range(len(first.train)):
        a, b = first.train.row(r), parallel.train.row(r)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_packing_report(tmp_path):
    src = os.path.join(ROOT, "data", "sft_messages.jsonl")
    with open(src) as fh:
        lines = [next(fh) for _ in range(400)]
    path = tmp_path / "part.jsonl"
    path.write_text("".join(lines))
    packed = build_data(cfg(tmp_path, [path], seq_length=256))
    plain = build_data(cfg(tmp_path, [path], seq_length=256, packing=False))
    rep = packed.report
    assert rep.train_rows == len(packed.train) < len(plain.train) == 400
    assert rep.packing_efficiency == pytest.approx(rep.train_tokens / (rep.train_rows * 256))
    assert rep.packing_efficiency > 0.95 > plain.report.packing_efficiency
    batch_tokens = sum(
        int((packed.train.row(r)["segment_ids"] < len(packed.train.row_samples(r))).sum())
        for r in range(len(packed.train))
    )
    assert batch_tokens == rep.train_tokens


def test_missing_column_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"qa\.jsonl: missing column.*'messages'.*'prompt' and 'response'"
    ):
        build_data(cfg(tmp_path, [path]))


def test_empty_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        build_data(cfg(tmp_path, [empty]))
    long = write_jsonl(
        tmp_path / "long.jsonl", [{"messages": conversation(i, turns=20)} for i in range(3)]
    )
    with pytest.raises(
        DataError,
        match=r"no usable training sample in .*long\.jsonl: 3 rows, 3 longer than data.seq_length",
    ):
        build_data(cfg(tmp_path, [long]))
    with pytest.raises(DataError, match=r"nowhere\.jsonl: no such file"):
        build_data(cfg(tmp_path, [tmp_path / "nowhere.jsonl"]))


def test_bad_json_and_bad_pair_values_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": conversation(1)}) + "\n\n" + '{"messages": [\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        build_data(cfg(tmp_path, [path]))
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": None}],
    )
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: column 'response' is None"):
        build_data(cfg(tmp_path, [pairs]))


def test_a_file_that_is_not_utf8_names_the_line_and_the_fix(tmp_path):
    # datasets reads it without complaint; the bad byte surfaces only when a row is decoded
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "a", "response": "b"}).encode() + b"\n"
    path.write_bytes(good + good + b'{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:3: not valid UTF-8 \(byte 0xe9 at byte "
                       r"16 of the line\); re-save the file as UTF-8"):
        build_data(cfg(tmp_path, [path]))
