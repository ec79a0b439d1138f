"""Padding of packed samples to a multiple of ``data.segment_multiple`` (what Transformer Engine's
THD context parallelism needs: every segment split into ``2 x cp`` chunks): the rows keep their
length, no pad is trained, the real tokens keep their labels and loss mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ift.data.collate import assemble_row
from megatron_ift.data.config import DataConfig
from megatron_ift.data.packing import cu_seqlens, thd_segment_multiple
from megatron_ift.validation import ConfigError


def _segments():
    return [(np.array([11, 12, 13]), np.array([0, 1, 1])),
            (np.array([21, 22, 23, 24, 25]), np.array([0, 0, 1, 1, 1])),
            (np.array([31, 32]), np.array([0, 1]))]


def test_the_packer_pads_every_segment_and_trains_no_pad():
    plain = assemble_row(_segments(), 24, 0, 7, packed=True)
    row = assemble_row(_segments(), 24, 0, 7, packed=True, multiple=4)
    assert all(len(v) == 24 for k, v in row.items() if k != "sample_ids")  # row length unchanged
    # segments 3 -> 4, 5 -> 8, 2 -> 4 tokens, then the row's own padding (8)
    assert row["segment_ids"].tolist() == [0] * 4 + [1] * 8 + [2] * 4 + [3] * 8
    assert row["position_ids"].tolist() == list(range(4)) + list(range(8)) + list(range(4)) + list(range(8))
    assert cu_seqlens(torch.from_numpy(row["segment_ids"])[None]).tolist() == [0, 4, 12, 16, 24]
    pads = [3, 9, 10, 11, 14, 15] + list(range(16, 24))
    assert all(row["tokens"][i] == 0 for i in pads)
    assert all(row["loss_mask"][i] == 0 for i in pads)  # no pad is trained
    # the real tokens keep their labels and loss mask (a segment's last token: none, as before)
    real = [0, 1, 2, 4, 5, 6, 7, 8, 12, 13]
    assert row["tokens"][real].tolist() == plain["tokens"][:10].tolist()
    assert row["loss_mask"][real].tolist() == plain["loss_mask"][:10].tolist()
    for i in real:
        if row["loss_mask"][i]:
            assert row["labels"][i] == row["tokens"][i + 1] and i + 1 not in pads
    assert row["loss_mask"].sum() == plain["loss_mask"].sum()
    with pytest.raises(ValueError, match="row has 12"):
        assemble_row(_segments(), 12, 0, 7, packed=True, multiple=4)  # 16 padded tokens


def test_the_sft_packer_packs_padded_lengths():
    from megatron_ift.data.sft import SFTDataset

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(5, 100, size=offsets[-1])
    masks = np.ones(offsets[-1], dtype=np.int64)
    members = np.arange(40)
    ds = SFTDataset(values, offsets, masks, members, members, seq_length=32, pad_id=0, packing=True,
                    segment_multiple=4)
    assert ds.num_tokens == lengths.sum()  # real tokens
    for i in range(len(ds)):
        row = ds.row(i)
        lengths = np.diff(cu_seqlens(torch.from_numpy(row["segment_ids"])[None]).numpy())
        assert (lengths % 4 == 0).all()  # every segment, and the row's own padding
        assert row["loss_mask"].sum() == sum(masks[offsets[k]:offsets[k + 1]][1:].sum()
                                             for k in ds.row_samples(i))


def test_the_multiple_for_thd_context_parallelism():
    assert thd_segment_multiple(1, 2, thd=True) == 4
    assert thd_segment_multiple(8, 2, thd=True) == 8
    assert thd_segment_multiple(6, 2, thd=True) == 12
    assert thd_segment_multiple(1, 2, thd=False) == 1  # the local spec splits whole rows
    assert thd_segment_multiple(4, 1, thd=True) == 4


@pytest.mark.parametrize("overrides, match", [
    (dict(segment_multiple=0), "data.segment_multiple=0 must be a positive integer"),
    (dict(segment_multiple=3, seq_length=128), "data.segment_multiple=3 must divide data.seq_length=128"),
    (dict(segment_multiple=4, packing=False), "needs data.format=sft with data.packing=true"),
    (dict(segment_multiple=4, format="pretrain", paths=("data/x",)), "needs data.format=sft"),
])
def test_the_segment_multiple_is_checked(overrides, match):
    base = dict(paths=("data/sft_messages.jsonl",), tokenizer_path="data/tokenizer", seq_length=128)
    with pytest.raises(ConfigError, match=match):
        DataConfig(**dict(base, **overrides))
    assert DataConfig(**base, segment_multiple=8).segment_multiple == 8
