"""Output-layer position selection at TP 2, with and without sequence parallelism: the selected
logits equal the full forward's logits at those positions; an empty selection runs one dummy
entry; the hook refuses gradients and leaves the layer as it found it."""

import sys

from common import dump, make_global_batch, setup, tiny_model

import torch
from megatron.core import parallel_state

from megatron_ift.checkpoint.model_io import unwrap
from megatron_ift.data.packing import attention_mask
from megatron_ift.training.engine import build_model
from megatron_ift.training.output_selection import PositionSelection, selected_output_positions


def check(sp: bool) -> dict:
    chunks, _ = build_model(tiny_model(), setup(tp=2, sp=sp))
    model = unwrap(chunks[0])
    model.eval()
    batch = make_global_batch(4, 16, 60, seed=4)
    args = (batch["tokens"], batch["position_ids"], attention_mask(batch))
    group = parallel_state.get_tensor_model_parallel_group()
    with torch.no_grad():
        full = model(*args)  # [b, s, v/tp]
        sel = PositionSelection.from_mask(batch["loss_mask"])
        with selected_output_positions(model, sel, group):
            picked = model(*args)  # [1, n, v/tp]
        empty = PositionSelection.from_mask(torch.zeros_like(batch["loss_mask"]))
        with selected_output_positions(model, empty, group):
            dummy = model(*args)
        after = model(*args)
    refused = False
    try:
        with selected_output_positions(model, sel, group):
            model(*args)
    except RuntimeError as exc:
        refused = "forward-only" in str(exc)
    expected = full[sel.rows, sel.cols]
    out = {
        "n": int(sel.rows.numel()),
        "trained": int(batch["loss_mask"].sum()),
        "shape": list(picked.shape),
        "max_err": float((picked[0] - expected).abs().max()),
        "scale": float(expected.abs().max()),
        "empty": [empty.empty, list(dummy.shape), float((dummy[0, 0] - full[0, 0]).abs().max())],
        "after_err": float((after - full).abs().max()),
        "sp_restored": model.output_layer.sequence_parallel == sp,
        "hooks_left": len(model.output_layer._forward_pre_hooks),
        "refused_grad": refused,
        "scatter_ok": bool(torch.equal(
            sel.scatter(batch["labels"][sel.rows, sel.cols], torch.zeros_like(batch["labels"]))[
                batch["loss_mask"].bool()], batch["labels"][batch["loss_mask"].bool()])),
    }
    parallel_state.destroy_model_parallel()
    return out


def main():
    dump(sys.argv[1], {"tp2": check(False), "tp2_sp": check(True)})


if __name__ == "__main__":
    main()
