"""IFTGPTModel's entry points against megatron-core's own GPTModel path.

At TP 2 with and without sequence parallelism (dropout on): the embedding stage on the table's
own lookup equals ``GPTModel.embedding`` bit for bit; the hidden states of chosen positions
through the output weight equal megatron's logits there; an empty selection (one dummy entry)
runs. With gradients, at TP 1, TP 2 and TP 2 + SP, float64 and float32: the IFT loss from the
selected positions (unfused: the output weight applied to the selected rows; fused: the chunked
log-probs) and every parameter gradient equal the full-logits path's.
"""

import sys

from common import PLATFORM, dump, make_global_batch, setup, tiny_model

import torch
from megatron.core import parallel_state
from vocab_parallel import label_logprobs

from megatron_ift.checkpoint.model_io import unwrap
from megatron_ift.data.packing import attention_mask
from megatron_ift.distributed import model_parallel_seed
from megatron_ift.ift import Groups, IFTConfig, ift_loss_terms, linear_label_logprobs
from megatron_ift.models.gpt import build_gpt_chunks, transformer_config
from megatron_ift.training.engine import build_model
from megatron_ift.training.microbatch import PositionSelection


def check(sp: bool) -> dict:
    chunks, _ = build_model(tiny_model(hidden_dropout=0.2), setup(tp=2, sp=sp), PLATFORM)
    model = unwrap(chunks[0])
    batch = make_global_batch(4, 16, 60, seed=4)
    args = (batch.tokens, batch.position_ids, attention_mask(batch.segment_ids))
    model.train()
    model_parallel_seed(7, PLATFORM)
    theirs = model.embedding(input_ids=batch.tokens, position_ids=batch.position_ids)
    model_parallel_seed(7, PLATFORM)
    ours = model.embedding_stage(model.embed_tokens(batch.tokens), batch.position_ids)
    model.eval()
    with torch.no_grad():
        full = model(*args)  # [b, s, v/tp]
        sel = PositionSelection.from_mask(batch.loss_mask)
        picked = model.output_logits(model.hidden_states(*args, positions=sel.seq_first_index()))
        empty = PositionSelection.from_mask(torch.zeros_like(batch.loss_mask))
        dummy = model.output_logits(model.hidden_states(*args, positions=empty.seq_first_index()))
    expected = full[sel.rows, sel.cols]
    out = {
        "embedding_equal": bool(torch.equal(theirs, ours)),
        "n": int(sel.rows.numel()),
        "trained": int(batch.loss_mask.sum()),
        "shape": list(picked.shape),
        "max_err": float((picked - expected).abs().max()),
        "scale": float(expected.abs().max()),
        "empty": [empty.empty, list(dummy.shape), float((dummy[0] - full[0, 0]).abs().max())],
        "scatter_ok": bool(torch.equal(
            sel.scatter(batch.labels[sel.rows, sel.cols], torch.zeros_like(batch.labels))[
                batch.loss_mask.bool()], batch.labels[batch.loss_mask.bool()])),
    }
    parallel_state.destroy_model_parallel()
    return out


def _loss(model, batch, mask, group, cfg, path: str):
    args = (batch.tokens, batch.position_ids, attention_mask(batch.segment_ids))
    sel = PositionSelection.from_mask(mask)
    labels = batch.labels[sel.rows, sel.cols]
    if path == "full":
        logps = label_logprobs(model(*args), batch.labels, group)  # [b, s]
    else:
        rows = model.hidden_states(*args, positions=sel.seq_first_index())  # [n, h]
        if path == "selected":  # the output weight on the selected rows, then the log-probs
            picked = label_logprobs(rows @ model.output_weight().t(), labels, group)
        else:  # fused with the log-probs, 5 positions per chunk
            picked = linear_label_logprobs(rows, model.output_weight(), labels, group, chunk_size=5)
        logps = sel.scatter_grad(picked)
    terms = ift_loss_terms(logps, mask, cfg, Groups.build(mask, batch.segment_ids))
    return terms.loss / terms.count.clamp(min=1)


def check_grad(tp: int, sp: bool) -> dict:
    par = setup(tp=tp, sp=sp)
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for dtype in (torch.float64, torch.float32):
        mcfg = tiny_model(tie_embeddings=dtype == torch.float64)  # tied and untied output layers
        (model,) = build_gpt_chunks(mcfg, par, PLATFORM,
                                    transformer_config(mcfg, par, PLATFORM, params_dtype=dtype))
        batch = make_global_batch(4, 16, 60, seed=5)
        for name, cfg, mask in (
            ("ift", IFTConfig(gamma=0.95), batch.loss_mask),
            ("sft_token_mean", IFTConfig(max_lambda=0.0, gamma=0.0, aggregation="token_mean"), batch.loss_mask),
            ("all_prompt", IFTConfig(gamma=0.95), torch.zeros_like(batch.loss_mask)),
        ):
            res = {}
            for path in ("full", "selected", "fused"):
                model.zero_grad(set_to_none=True)
                loss = _loss(model, batch, mask, group, cfg, path)
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
