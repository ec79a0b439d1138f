"""Pretraining continuation: jsonl -> .bin/.idx (megatron-core builder) -> GPTDataset batches."""

import json
import os

import numpy as np
import pytest
from _infra import ROOT

from megatron_ift.data import DataConfig, DataError, build_data, load_tokenizer
from megatron_ift.data.indexed import check_indexed
from megatron_ift.data.preprocess import main as preprocess_main
from megatron_ift.data.preprocess import preprocess

TOKENIZER = os.path.join(ROOT, "data", "tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def write_texts(path, texts):
    with open(path, "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t, "id": len(t)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two indexed corpora whose tokens tell them apart: A uses letters a-e, B digits."""
    tmp = tmp_path_factory.mktemp("indexed")
    rng = np.random.default_rng(0)
    a = ["".join(rng.choice(list("abcde"), size=rng.integers(5, 40))) for _ in range(300)]
    b = [
        " ".join(str(x) for x in rng.integers(0, 99, size=rng.integers(3, 20))) for _ in range(300)
    ]
    for name, texts in (("a", a), ("b", b)):
        preprocess(
            [write_texts(tmp / f"{name}.jsonl", texts)],
            str(tmp / name),
            TOKENIZER,
            workers=1,
            progress=False,
        )
    return tmp, a, b


def test_preprocess_round_trip(tmp_path, tokenizer, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = ["The sum of 1 and 2 is 3.", "", "Reversed, abc reads cba.", "héllo wörld ✓"] * 25
    src = write_texts(tmp_path / "t.jsonl", texts)
    with open(src, "a") as fh:
        fh.write("\n")  # blank lines are skipped
    prefix = str(tmp_path / "out" / "t")
    assert (
        preprocess_main(
            [
                "--input",
                src,
                "--output-prefix",
                prefix,
                "--tokenizer",
                TOKENIZER,
                "--workers",
                "2",
                "--chunk-size",
                "8",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "75 documents" in out and "25 empty lines skipped" in out
    ds = IndexedDataset(prefix)
    eod = tokenizer.eos_token_id
    want = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eod] for t in texts if t]
    assert len(ds) == len(want) == 75
    assert [ds[i].tolist() for i in range(len(ds))] == want
    assert ds[0].dtype == np.uint16  # a 384-id vocabulary fits 16 bits
    assert check_indexed(prefix) == 75
    assert not os.path.exists(prefix + ".bin.tmp")


def test_preprocess_errors_name_the_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n\n{"body": "no text key"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: missing column 'text'"):
        preprocess([str(src)], str(tmp_path / "o"), TOKENIZER, progress=False)
    src.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        preprocess([str(src)], str(tmp_path / "o"), TOKENIZER, progress=False)
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())  # nothing half-written


def test_blend_follows_weights_and_contract(corpora, tokenizer):
    tmp, _, _ = corpora
    cfg = DataConfig(
        format="pretrain",
        paths=(str(tmp / "a"), str(tmp / "b")),
        weights=(0.25, 0.75),
        tokenizer_path=TOKENIZER,
        seq_length=16,
        packing=False,
        cache_dir=str(tmp / "cache"),
    )
    data = build_data(cfg, train_samples=800)
    assert len(data.train) >= 800
    letters = {tokenizer.convert_tokens_to_ids(c) for c in "abcde"}
    it = data.train_iterator(dp_rank=0, dp_size=1, micro_batch_size=8, num_microbatches=1)
    from_a = 0
    for _ in range(100):
        batch = next(it)
        assert batch.segment_ids is None  # unpacked
        assert batch.tokens.shape == (8, 16)
        assert (batch.labels[:, :-1] == batch.tokens[:, 1:]).all()
        assert (batch.loss_mask == 1).all()  # raw text: loss on every token
        assert (batch.position_ids == np.arange(16)).all()
        for row in batch.tokens.tolist():
            from_a += bool(set(row) & letters)
    frac = from_a / 800
    assert abs(frac - 0.25) < 0.05, frac


def test_packed_pretrain_rows_split_at_end_of_document(corpora, tokenizer):
    tmp, a, _ = corpora
    cfg = DataConfig(
        format="pretrain",
        paths=(str(tmp / "a"),),
        tokenizer_path=TOKENIZER,
        seq_length=64,
        eval_fraction=0.1,
        cache_dir=str(tmp / "cache"),
    )
    data = build_data(cfg)
    assert data.eval is not None and len(data.eval) > 0
    eod = tokenizer.eos_token_id
    batch = next(data.train_iterator(dp_rank=0, dp_size=1, micro_batch_size=4, num_microbatches=1))
    tokens, seg, pos, lm = batch.tokens, batch.segment_ids, batch.position_ids, batch.loss_mask
    assert (tokens == eod).sum() > 4
    for i in range(4):
        ends = (tokens[i, :-1] == eod).nonzero().flatten().tolist()
        for t in ends:  # a new document starts right after every end-of-document token
            assert seg[i, t + 1] == seg[i, t] + 1 and pos[i, t + 1] == 0
            assert lm[i, t] == 0  # never trained to predict the next document's first token
        assert int(lm[i].sum()) == 64 - int((tokens[i] == eod).sum())
        assert seg[i].diff().clamp(min=0).sum() == len(ends)


def test_unreadable_index_files(tmp_path, corpora):
    tmp, _, _ = corpora
    import shutil

    prefix = str(tmp_path / "x")
    shutil.copy(str(tmp / "a") + ".bin", prefix + ".bin")
    with open(prefix + ".idx", "wb") as fh:
        fh.write(b"not an index at all")
    cfg = DataConfig(
        format="pretrain",
        paths=(prefix,),
        tokenizer_path=TOKENIZER,
        seq_length=16,
        cache_dir=str(tmp_path / "c"),
    )
    with pytest.raises(DataError, match=r"x\.idx: unreadable index, not a Megatron \.idx file"):
        build_data(cfg)
    good = open(str(tmp / "a") + ".idx", "rb").read()
    with open(prefix + ".idx", "wb") as fh:
        fh.write(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match=r"x\.idx: unreadable index \(truncated"):
        build_data(cfg)
    with open(prefix + ".idx", "wb") as fh:
        fh.write(good)
    with open(prefix + ".bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(DataError, match=r"x\.bin: .* bytes, but .*x\.idx describes"):
        build_data(cfg)
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"x\.bin: missing"):
        build_data(cfg)
