"""The estimation pass's output-layer position selection (``training/output_selection.py``)."""

import json

import pytest
import torch

from dist_utils import torchrun
from megatron_ift.training.output_selection import PositionSelection


def test_selection_from_mask_and_scatter():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.float32)
    sel = PositionSelection.from_mask(mask)
    assert not sel.empty
    assert sel.rows.tolist() == [0, 0, 2, 2] and sel.cols.tolist() == [1, 2, 0, 3]
    # Megatron's [s, b] layout: flat index = col * b + row
    assert sel.seq_first_index().tolist() == [3, 6, 2, 11]
    out = sel.scatter(torch.tensor([5, 6, 7, 8]), torch.full((3, 4), -1))
    assert out.tolist() == [[-1, 5, 6, -1], [-1, -1, -1, -1], [7, -1, -1, 8]]

    none = PositionSelection.from_mask(torch.zeros(2, 3))
    assert none.empty and none.rows.tolist() == [0] and none.cols.tolist() == [0]
    fill = torch.zeros(2, 3)
    assert torch.equal(none.scatter(torch.tensor([9.0]), fill), fill)  # the dummy is never written


@pytest.mark.dist
def test_selected_logits_equal_full_logits_at_tp2_with_and_without_sp(tmp_path):
    out = tmp_path / "sel.json"
    torchrun("output_selection.py", 2, str(out), timeout=200)
    res = json.loads(out.read_text())
    for name, r in res.items():
        assert r["n"] == r["trained"] > 0, name
        assert r["shape"] == [1, r["n"], 64 // 2], name  # vocab 60 padded to 64, split over TP 2
        assert r["max_err"] <= 1e-6 * max(1.0, r["scale"]), (name, r)
        is_empty, dummy_shape, dummy_err = r["empty"]
        assert is_empty and dummy_shape == [1, 1, 32] and dummy_err <= 1e-6, (name, r)
        assert r["after_err"] == 0.0 and r["sp_restored"] and r["hooks_left"] == 0, (name, r)
        assert r["refused_grad"] and r["scatter_ok"], (name, r)
