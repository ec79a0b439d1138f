"""SDPA core attention vs megatron-core's local DotProductAttention inside a whole GPT model, at
TP 1 (world 2 = DP 2), TP 2 and TP 2 with sequence parallelism: logits and every parameter
gradient, float64 and float32, packed (block mask) and unpacked (causal) rows; plus attention
dropout in training mode. Rank 0 writes the errors as JSON."""

import dataclasses
import sys

from common import PLATFORM, dump, make_global_batch, setup, tiny_model

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ift.data.packing import attention_mask
from megatron_ift.models.attention import SDPAttention
from megatron_ift.models.gpt import build_gpt_chunks, transformer_config


def packed(batch):
    """Cut every row into three segments (positions restart), as the packed collator does."""
    b, s = batch.shape
    seg = torch.zeros(b, s, dtype=torch.long)
    seg[:, s // 3:] = 1
    seg[:, 2 * s // 3:] = 2
    pos = torch.cat([torch.arange(n) for n in torch.unique_consecutive(seg[0], return_counts=True)[1].tolist()])
    return dataclasses.replace(batch, segment_ids=seg, position_ids=pos.repeat(b, 1))


def build(backend, par, dtype, dropout=0.0, packed_rows=False):
    model = tiny_model(attention_backend=backend, attention_dropout=dropout)
    cfg = transformer_config(model, par, PLATFORM, params_dtype=dtype)
    return build_gpt_chunks(model, par, PLATFORM, cfg, packed_rows=packed_rows)[0]


def run(model, batch, weight):
    model.zero_grad(set_to_none=True)
    logits = model(batch.tokens, batch.position_ids, attention_mask(batch.segment_ids))  # [b, s, v/tp]
    (logits * weight[..., : logits.shape[-1]]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), grads


def compare(tp, sp) -> dict:
    par = setup(tp=tp, sp=sp)
    out = {}
    for dtype in (torch.float64, torch.float32):
        local = build("local", par, dtype)
        local_packed = build("local", par, dtype, packed_rows=True)  # its "arbitrary" mask type
        fused = build("sdpa", par, dtype)
        fused.load_state_dict(local.state_dict())
        local_packed.load_state_dict(local.state_dict())
        n_sdpa = sum(isinstance(m, SDPAttention) for m in fused.modules())
        n_local_sdpa = sum(isinstance(m, SDPAttention) for m in local.modules())
        for kind in ("unpacked", "packed"):
            batch = make_global_batch(4, 24, 60, seed=7)
            if kind == "packed":
                batch = packed(batch)
            g = torch.Generator().manual_seed(3)
            weight = torch.randn(4, 24, 64, generator=g, dtype=dtype)
            l_ref, g_ref = run(local_packed if kind == "packed" else local, batch, weight)
            l_new, g_new = run(fused, batch, weight)
            grad_err = max(float((g_new[n] - g_ref[n]).abs().max() / g_ref[n].abs().max().clamp(min=1e-30))
                           for n in g_ref)
            out[f"{str(dtype)[6:]}_{kind}"] = {
                "logit_err": float((l_new - l_ref).abs().max()),
                "logit_scale": float(l_ref.abs().max()),
                "grad_rel_err": grad_err,
                "num_grads": len(g_ref),
                "sdpa_modules": n_sdpa,
                "sdpa_in_local": n_local_sdpa,
            }
    # Dropout honoured: training mode differs from eval, eval equals the local module's output.
    drop = build("sdpa", par, torch.float32, dropout=0.5)
    batch = make_global_batch(4, 24, 60, seed=7)
    args = (batch.tokens, batch.position_ids, None)
    with torch.no_grad():
        drop.train()
        a = drop(*args)
        drop.eval()
        b = drop(*args)
    out["dropout_train_vs_eval"] = float((a - b).abs().max())
    parallel_state.destroy_model_parallel()
    return out


def main():
    res = {}
    for tp, sp in ((1, False), (2, False), (2, True)):
        res[f"tp{tp}{'_sp' if sp else ''}"] = compare(tp, sp)
    dump(sys.argv[1], res)
    dist.barrier()


if __name__ == "__main__":
    main()
