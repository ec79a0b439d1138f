"""The load-balanced context-parallel layout: which tokens a rank holds and how the gathered
chunks go back to sequence order. The collectives, and the agreement with megatron-core's own
per-rank rotary slice (the model's rotary positions follow it), are checked by the step matrix
(tests/distributed/test_step_parallel.py: CP layouts equal the single-process reference)."""

import pytest
import torch

from megatron_ift.ift.context_parallel import gathered_order, local_positions


@pytest.mark.parametrize("s,cp", [(16, 2), (16, 4), (24, 3), (8, 1)])
def test_ranks_hold_chunks_r_and_2cp_minus_1_minus_r(s, cp):
    c = s // (2 * cp)
    every = [local_positions(s, r, cp) for r in range(cp)]
    for r, pos in enumerate(every):
        assert pos.tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
    assert sorted(torch.cat(every).tolist()) == list(range(s))  # every token once
    # concatenating the ranks' tokens in rank order, then gathered_order, is the sequence
    row = torch.arange(100, 100 + s)
    gathered = torch.cat([row[p] for p in every])
    assert torch.equal(gathered.index_select(0, gathered_order(s, cp)), row)


def test_a_sequence_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="not a multiple of 2 x context parallel size = 4"):
        local_positions(18, 0, 2)
