"""The model's output at chosen positions (``models/ift_model.py``, ``training/microbatch.py``):
the embedding stage equals megatron-core's bit for bit; selected logits equal the full forward's;
differentiable for the optimisation pass (loss and every gradient equal the full-logits path:
1e-10 / 1e-12 in float64, 1e-5 in float32, relative to the largest entry, TP 1 / 2 / SP), also
with the output layer fused into chunked log-probs (``ift/logprobs.py: linear_label_logprobs``)."""
import torch

from megatron_ift.training.microbatch import PositionSelection


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
