"""Output-layer position selection at TP 2, with and without sequence parallelism: the selected
logits equal the full forward's logits at those positions; an empty selection runs one dummy
entry; the hook leaves the layer as it found it. With gradients (the optimisation pass), at
TP 1, TP 2 and TP 2 + SP, float64 and float32: the IFT loss from the selected logits and every
parameter gradient equal the full-logits path's."""

import sys

from common import dump, make_global_batch, setup, tiny_model

import torch
from megatron.core import parallel_state

from megatron_ift.checkpoint.model_io import unwrap
from megatron_ift.data.packing import attention_mask
from megatron_ift.ift import Groups, IFTConfig, ift_loss_terms, label_logprobs
from megatron_ift.models.gpt import build_gpt_chunks, transformer_config
from megatron_ift.training.engine import build_model
from megatron_ift.ift.logprobs import linear_label_logprobs
from megatron_ift.training.output_selection import (
    PositionSelection,
    fused_output_positions,
    selected_output_positions,
)


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
        "scatter_ok": bool(torch.equal(
            sel.scatter(batch["labels"][sel.rows, sel.cols], torch.zeros_like(batch["labels"]))[
                batch["loss_mask"].bool()], batch["labels"][batch["loss_mask"].bool()])),
    }
    parallel_state.destroy_model_parallel()
    return out


def _loss(model, batch, group, cfg, path: str):
    args = (batch["tokens"], batch["position_ids"], attention_mask(batch))
    mask = batch["loss_mask"]
    sel = PositionSelection.from_mask(mask)
    if path == "selected":
        with selected_output_positions(model, sel, group):
            logits = model(*args)  # [1, n, v/tp]
        picked = label_logprobs(logits[0], batch["labels"][sel.rows, sel.cols], group)
        logps = sel.scatter_grad(picked)
    elif path == "fused":  # output layer fused with the log-probs, 5 positions per chunk
        with fused_output_positions(model, sel, group) as inputs:
            empty = model(*args)
        assert empty.shape[:2] == (1, 0), empty.shape
        picked = linear_label_logprobs(inputs.hidden, inputs.weight,
                                       batch["labels"][sel.rows, sel.cols], group, chunk_size=5)
        logps = sel.scatter_grad(picked)
    else:
        logps = label_logprobs(model(*args), batch["labels"], group)  # [b, s]
    terms = ift_loss_terms(logps, mask, cfg, Groups.build(mask, batch.get("segment_ids")))
    return terms.loss / terms.count.clamp(min=1)


def check_grad(tp: int, sp: bool) -> dict:
    par = setup(tp=tp, sp=sp)
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for dtype in (torch.float64, torch.float32):
        mcfg = tiny_model(tie_embeddings=dtype == torch.float64)  # tied and untied output layers
        (model,) = build_gpt_chunks(mcfg, par, transformer_config(mcfg, par, params_dtype=dtype))
        batch = make_global_batch(4, 16, 60, seed=5)
        for name, cfg, mask in (
            ("ift", IFTConfig(gamma=0.95), batch["loss_mask"]),
            ("sft_token_mean", IFTConfig(max_lambda=0.0, gamma=0.0, aggregation="token_mean"), batch["loss_mask"]),
            ("all_prompt", IFTConfig(gamma=0.95), torch.zeros_like(batch["loss_mask"])),
        ):
            b = dict(batch, loss_mask=mask)
            res = {}
            for path in ("full", "selected", "fused"):
                model.zero_grad(set_to_none=True)
                loss = _loss(model, b, group, cfg, path)
                loss.backward()
                res[path] = (float(loss), {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                           for n, p in model.named_parameters()})
            l_full, g_full = res["full"]
            for path in ("selected", "fused"):
                l_sel, g_sel = res[path]
                out[f"{str(dtype)[6:]}_{name}_{path}"] = {
                    "loss_full": l_full, "loss_err": abs(l_sel - l_full),
                    "grad_rel_err": max(float((g_sel[n] - g_full[n]).abs().max()
                                              / g_full[n].abs().max().clamp(min=1e-30)) for n in g_full),
                    "grad_max": max(float(g.abs().max()) for g in g_full.values()),
                    "num_grads": len(g_full),
                }
    parallel_state.destroy_model_parallel()
    return out


def main():
    res = {"tp2": check(False), "tp2_sp": check(True)}
    for tp, sp in ((1, False), (2, False), (2, True)):
        res[f"grad_tp{tp}{'_sp' if sp else ''}"] = check_grad(tp, sp)
    dump(sys.argv[1], res)


if __name__ == "__main__":
    main()
