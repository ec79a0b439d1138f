"""Packing units: bin packing, row layout (segments, positions, labels, loss mask), masks."""

import numpy as np
import pytest
import torch

from megatron_ift.data import (
    attention_mask,
    collate,
    cu_seqlens,
    packed_attention_mask,
)
from megatron_ift.data.collate import assemble_row, empty_row
from megatron_ift.data.packing import (
    causal_attention_mask,
    pack_best_fit,
    packing_efficiency,
)


def test_best_fit_packs_every_sample_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500)
    offsets, items = pack_best_fit(lengths, 256)
    assert sorted(items.tolist()) == list(range(500))
    rows = [items[offsets[r] : offsets[r + 1]] for r in range(len(offsets) - 1)]
    assert all(lengths[r].sum() <= 256 for r in rows)
    assert all(list(r) == sorted(r) for r in rows)
    eff = packing_efficiency(int(lengths.sum()), len(rows), 256)
    assert eff > 0.95
    assert len(rows) >= int(np.ceil(lengths.sum() / 256))  # no better than the volume bound
    again = pack_best_fit(lengths, 256)
    assert np.array_equal(again[0], offsets) and np.array_equal(again[1], items)
    with pytest.raises(ValueError, match=r"in \[1, 256\]"):
        pack_best_fit([10, 300], 256)


def test_best_fit_small_example():
    # Lengths 6, 5, 4, 3, 1 in that order: 6 opens row 0 (4 left); 5 does not fit, opens row 1
    # (5 left); 4 goes to the fullest row it fits, row 0 (exactly full); 3 and 1 go to row 1.
    offsets, items = pack_best_fit([3, 5, 4, 6, 1], 10)
    rows = [items[offsets[r] : offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]
    assert rows == [[2, 3], [0, 1, 4]]


def segments():
    a = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1]))
    b = (np.array([20, 21, 22]), np.array([0, 1, 1]))
    c = (np.array([30, 31]), np.array([0, 1]))
    return [a, b, c]


def test_packed_row_layout():
    row = assemble_row(segments(), 12, pad_id=1, sample_id=7, packed=True)
    assert row["tokens"].tolist() == [10, 11, 12, 13, 20, 21, 22, 30, 31, 1, 1, 1]
    assert row["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # padding: own id
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]
    assert row["labels"].tolist() == row["tokens"][1:].tolist() + [1]
    # labels[t] = tokens[t+1] trained iff tokens[t+1] is an assistant token of the same segment;
    # each segment's last position (3, 6, 8) and the padding stay 0.
    assert row["loss_mask"].tolist() == [0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0]
    assert int(row["sample_ids"]) == 7


def test_unpacked_row_and_collate_contract():
    (ids, mask), _, _ = segments()
    rows = [assemble_row([(ids, mask)], 6, 1, 3, packed=False), empty_row(6, 1, packed=False)]
    batch = collate(rows)
    assert batch.segment_ids is None and batch.shape == (2, 6)
    for t in (batch.tokens, batch.labels, batch.position_ids):
        assert t.dtype == torch.int64 and t.shape == (2, 6)
    assert batch.loss_mask.dtype == torch.float32
    assert batch.sample_ids.tolist() == [3, -1] and batch.sample_ids.dtype == torch.int64
    assert batch.position_ids[0].tolist() == list(range(6))
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 0, 0], [0] * 6]
    packed = collate([assemble_row(segments(), 12, 1, 0, packed=True)])
    assert packed.segment_ids.dtype == torch.int64


def brute_force_mask(seg):
    b, s = seg.shape
    m = torch.ones(b, 1, s, s, dtype=torch.bool)
    for i in range(b):
        for q in range(s):
            for k in range(q + 1):
                if seg[i, q] == seg[i, k]:
                    m[i, 0, q, k] = False
    return m


def test_attention_masks():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    mask = packed_attention_mask(seg)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 8, 8)
    assert torch.equal(mask, brute_force_mask(seg))
    assert mask[0, 0, 3, 2] and not mask[0, 0, 4, 3]  # no attention to the previous sample
    causal = causal_attention_mask(2, 8)
    assert torch.equal(causal, packed_attention_mask(torch.zeros(2, 8, dtype=torch.long)))
    # One sample plus padding: the real tokens see exactly what the causal mask allows.
    assert torch.equal(mask[1, 0, :6, :6], causal[1, 0, :6, :6])
    assert torch.equal(attention_mask(seg), mask)
    assert attention_mask(None) is None  # unpacked: megatron-core's causal default


def test_cu_seqlens_and_packed_seq_params():
    from megatron_ift.data.batch import Batch
    from megatron_ift.training.microbatch import MicroBatch

    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    cu = cu_seqlens(seg)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 8, 14, 16]  # rows flattened; padding is its own sequence
    ones = torch.ones_like(seg)
    batch = Batch(tokens=seg, labels=seg, loss_mask=ones.float(), position_ids=seg,
                  sample_ids=torch.arange(2), segment_ids=seg)
    params = MicroBatch.prepare(batch, 0, torch.device("cpu"), thd=True).packed_seq_params
    assert params.qkv_format == "thd"
    assert torch.equal(params.cu_seqlens_q, cu) and torch.equal(params.cu_seqlens_kv, cu)
    assert params.max_seqlen_q == params.max_seqlen_kv == 6
    assert MicroBatch.prepare(batch, 0, torch.device("cpu"), thd=False).packed_seq_params is None
    row = collate([assemble_row(segments(), 12, 1, 0, packed=True)])
    assert cu_seqlens(row.segment_ids).tolist() == [0, 4, 7, 9, 12]
