"""Packed rows (THD) under context parallelism on the Transformer Engine spec: TE's split of every
packed segment over the ranks (checked against a plain-Python reference, odd segment lengths
padded to a multiple of ``2 x cp`` as the packer pads them: tests/unit/test_data_segment_padding.py),
the micro-batch a rank gets, and the refusals. The trainer
end to end (TE THD CP 2 equal to the local spec at CP 2 and CP 1 on the same padded rows) is in
tests/distributed/test_transformer_engine_standin.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ift.data.collate import assemble_row, collate, padded_length
from megatron_ift.data.packing import cu_seqlens
from megatron_ift.ift.context_parallel import (
    check_thd_split,
    local_positions,
    thd_gathered_order,
    thd_local_positions,
)


def _reference(lengths: list[int], rank: int, cp: int) -> list[int]:
    """Rank ``rank``'s global token indices: chunks ``rank`` and ``2 cp - 1 - rank`` of every
    sequence, sequences in order (TE's THD context-parallel split)."""
    out, start = [], 0
    for n in lengths:
        c = n // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            out += list(range(start + chunk * c, start + (chunk + 1) * c))
        start += n
    return out


# real segment lengths, odd ones included: padded to a multiple of 2 x cp first
CASES = [([5, 7, 4], 2), ([1, 3, 8, 2], 2), ([9, 2, 5], 4), ([12, 1, 6], 3), ([7], 1), ([3, 3], 1)]


@pytest.mark.parametrize("real,cp", CASES)
def test_thd_split_matches_the_reference(real, cp):
    lengths = [padded_length(n, 2 * cp) for n in real]
    assert all(p >= n and p % (2 * cp) == 0 and p - n < 2 * cp for n, p in zip(real, lengths))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    check_thd_split(cu, cp)
    every = []
    for r in range(cp):
        got = thd_local_positions(cu, r, cp)
        assert got.tolist() == _reference(lengths, r, cp)
        # the same without reading cu back (the device form: the count is given)
        assert torch.equal(thd_local_positions(cu, r, cp, local_tokens=sum(lengths) // cp), got)
        every.append(got)
    assert sorted(torch.cat(every).tolist()) == list(range(sum(lengths)))  # every token once
    row = torch.arange(100, 100 + sum(lengths))
    gathered = torch.cat([row[p] for p in every])  # the ranks' tokens in rank order
    assert torch.equal(gathered.index_select(0, thd_gathered_order(cu, cp)), row)


@pytest.mark.parametrize("s,cp", [(16, 2), (24, 3), (32, 4)])
def test_one_sequence_is_the_row_layout(s, cp):
    cu = torch.tensor([0, s], dtype=torch.int32)
    for r in range(cp):
        assert torch.equal(thd_local_positions(cu, r, cp), local_positions(s, r, cp))


def test_a_segment_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match=r"lengths \[6, 2\] are not multiples of 2 x context parallel size = 4"):
        check_thd_split(torch.tensor([0, 8, 14, 16], dtype=torch.int32), 2)


def _segments():
    return [(np.array([11, 12, 13]), np.array([0, 1, 1])),
            (np.array([21, 22, 23, 24, 25]), np.array([0, 0, 1, 1, 1])),
            (np.array([31, 32]), np.array([0, 1]))]


def test_a_rank_gets_its_share_of_every_segment():
    from megatron_ift.data.batch import Batch
    from megatron_ift.training.microbatch import MicroBatch

    batch = collate([assemble_row(_segments(), 24, 0, 7, packed=True, multiple=4)])
    cu = cu_seqlens(batch.segment_ids)
    shares = []
    for r in range(2):
        mb = MicroBatch.prepare(batch, 0, torch.device("cpu"), thd=True, cp_rank=r, cp_size=2)
        assert mb.positions.tolist() == _reference([4, 8, 4, 8], r, 2)
        assert torch.equal(mb.tokens, batch.tokens[:, mb.positions])
        assert torch.equal(mb.rows.tokens, batch.tokens)  # the whole row for the IFT math
        psp = mb.packed_seq_params
        assert psp.qkv_format == "thd" and psp.max_seqlen_q == psp.max_seqlen_kv == 8
        for cu_ in (psp.cu_seqlens_q, psp.cu_seqlens_kv, psp.cu_seqlens_q_padded, psp.cu_seqlens_kv_padded):
            assert torch.equal(cu_, cu)  # the whole row's sequences, as TE takes them under CP
        assert torch.equal(mb.gather_order, thd_gathered_order(cu, 2))
        assert mb.attention_mask() is None
        shares.append(mb.tokens)
    gathered = torch.cat(shares, dim=1)[0]
    assert torch.equal(gathered.index_select(0, mb.gather_order), batch.tokens[0])
    # CP 1 and the local spec keep the row layout
    assert MicroBatch.prepare(batch, 0, torch.device("cpu"), thd=True).packed_seq_params.cu_seqlens_q_padded is None
    assert MicroBatch.prepare(batch, 0, torch.device("cpu"), thd=False, cp_rank=0, cp_size=2).gather_order is None
    # rows whose segments were not padded, or two rows per micro-batch, are refused
    unpadded = collate([assemble_row(_segments(), 24, 0, 7, packed=True)])
    with pytest.raises(ValueError, match="not multiples of 2 x context parallel size = 4"):
        MicroBatch.prepare(unpadded, 0, torch.device("cpu"), thd=True, cp_rank=0, cp_size=2)
    two = Batch(**{k: torch.cat([getattr(batch, k)] * 2) for k in
                   ("tokens", "labels", "loss_mask", "position_ids", "sample_ids", "segment_ids")})
    with pytest.raises(ValueError, match="one row per micro-batch"):
        MicroBatch.prepare(two, 0, torch.device("cpu"), thd=True, cp_rank=0, cp_size=2)
