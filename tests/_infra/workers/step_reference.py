"""Single-process reference of one IFT step: plain autograd on a TP1/PP1 model with
``tests/_infra/reference.py`` (the spec oracle) on the whole global batch, then torch AdamW.

Writes ``<ref>/init`` (the shared initial weights), ``<ref>/grads`` and ``<ref>/params`` (as
model-layout dist checkpoints, so any parallel layout can load them) and ``<ref>/ref.json``.
In a world of several processes (data-parallel replicas of the TP1/PP1 model) every rank computes
the same reference and dist_checkpointing writes rank 0's copy.
"""

import dataclasses
import json
import os
import sys

from common import PLATFORM, make_global_batch, rank, save_grads_as_model, setup, tiny_model
from megatron_ift.distributed import model_parallel_seed

import torch

from _infra import reference  # the spec oracle (tests/ is on the launcher's PYTHONPATH)
from megatron_ift.checkpoint.model_io import save_model
from megatron_ift.data.packing import attention_mask
from megatron_ift.ift import IFTConfig, lambda_at
from megatron_ift.models.gpt import build_gpt_chunks  # noqa: E402


def main():
    specs = json.loads(sys.argv[1])
    par = setup()
    for opts in specs if isinstance(specs, list) else [specs]:
        reference_step(opts, par)


def reference_step(opts, par):
    ref = opts["ref"]
    model_parallel_seed(opts["seed"] + 100, PLATFORM)
    model_cfg = tiny_model(**opts.get("model", {}))
    cfg = IFTConfig(**opts["ift"])
    (model,) = build_gpt_chunks(model_cfg, par, PLATFORM)
    save_model([model], os.path.join(ref, "init"))
    b = make_global_batch(opts["global_batch"], opts["seq"], model_cfg.vocab_size, seed=opts["seed"],
                          packed=opts.get("packed", False), multi_turn=opts.get("multi_turn", False))
    V = model_cfg.vocab_size
    seg = b.segment_ids
    mask = attention_mask(seg)  # packed rows: block-diagonal causal; else megatron-core's causal

    lam = lambda_at(cfg, 0)
    model.eval()
    with torch.no_grad():
        logits = model(b.tokens, b.position_ids, mask)  # [b, s, V_padded]
    xhat = reference.estimated_tokens(logits[..., :V], b.tokens, b.loss_mask, cfg, 0,
                                      segment_ids=seg, sample_ids=b.sample_ids)
    # the estimation pass's metric: SFT loss of the ground-truth input (gamma 0: plain CE)
    loss_sft, _ = reference.ift_loss(logits, b.labels, b.loss_mask, dataclasses.replace(cfg, gamma=0.0),
                                     segment_ids=seg)
    model.train()
    E = model.embedding.word_embeddings.weight
    if cfg.mixing_embeddings == "detached":
        E = E.detach()
    mixed = reference.mixed_inputs(E, b.tokens, xhat, lam).transpose(0, 1).contiguous()
    logits = model(b.tokens, b.position_ids, mask, decoder_input=mixed)
    loss, metrics = reference.ift_loss(logits, b.labels, b.loss_mask, cfg, segment_ids=seg,
                                       microbatch_rows=opts["mbs"])
    loss.backward()
    save_grads_as_model([model], os.path.join(ref, "grads"))

    o = opts["optim"]
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if o.get("clip_grad", 1.0) > 0:
        torch.nn.utils.clip_grad_norm_(params, o.get("clip_grad", 1.0))
    opt = torch.optim.AdamW(
        params, lr=o["lr"], betas=(o.get("adam_beta1", 0.9), o.get("adam_beta2", 0.95)),
        eps=o.get("adam_eps", 1e-8), weight_decay=0.0,
    )
    opt.step()
    save_model([model], os.path.join(ref, "params"))
    if rank() != 0:
        return
    with open(os.path.join(ref, "ref.json"), "w") as f:
        json.dump({"loss": float(loss), "metrics": dict(metrics, loss_sft=float(loss_sft))}, f)


if __name__ == "__main__":
    main()
