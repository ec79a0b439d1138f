"""Packed vs one-by-one: the same per-sample IFT losses and gradients (tiny megatron-core GPT).

Run as ``python tests/_infra/workers/data_packing_equivalence.py IN.pt OUT.json`` (one process).
``IN.pt`` holds a packed micro-batch and the same samples as one-sample micro-batches, in segment
order, as the fields of :class:`~megatron_ift.data.batch.Batch` (made by
tests/distributed/test_data_packing_model.py from the shipped data). For RoPE and learned absolute position
embeddings, the full IFT step (greedy estimation pass, estimated sequence, lambda-mixed
embeddings, weighted loss with gamma 0.95 / lambda 0.2) runs on both, and the per-sample losses
and summed gradients are compared; the results are written as JSON for the test to judge.
"""

from __future__ import annotations

import json
import sys

from megatron_ift.platform import bootstrap

PLATFORM = bootstrap()

import torch  # noqa: E402
from vocab_parallel import label_logprobs  # noqa: E402

from megatron_ift.data import packed_attention_mask  # noqa: E402
from megatron_ift.data.batch import Batch  # noqa: E402
from megatron_ift.data.packing import causal_attention_mask  # noqa: E402
from megatron_ift.distributed import destroy_distributed, init_distributed, model_parallel_seed  # noqa: E402
from megatron_ift.ift import (  # noqa: E402
    Groups,
    IFTConfig,
    estimate,
    estimated_sequence,
    propagation_weights,
)
from megatron_ift.models.config import ModelConfig  # noqa: E402
from megatron_ift.models.gpt import build_gpt_chunks  # noqa: E402
from megatron_ift.parallel import ParallelConfig  # noqa: E402

LAMBDA = 0.2


def ift_step(model, batch: Batch, mask, vocab, *, global_positions=False):
    """Per-sample IFT losses ``[num_samples]`` (in row/segment order) of one micro-batch."""
    cfg = IFTConfig(gamma=0.95, max_lambda=LAMBDA)
    tokens, labels, loss_mask, seg = batch.tokens, batch.labels, batch.loss_mask, batch.segment_ids
    pos = batch.position_ids
    if global_positions:
        pos = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    with torch.no_grad():
        logits = model(tokens, pos, mask)  # [b, s, v]
        est = estimate(logits, cfg, vocab)  # [b, s]
    xhat = estimated_sequence(tokens, est, loss_mask, seg)
    emb = (1 - LAMBDA) * model.embedding(tokens, pos) + LAMBDA * model.embedding(
        xhat, pos
    )  # [s, b, h]
    logits = model(tokens, pos, mask, decoder_input=emb)  # [b, s, v]
    logps = label_logprobs(logits, labels)  # [b, s]
    groups = Groups.build(loss_mask, seg)
    w = propagation_weights(logps, loss_mask, cfg, groups)
    n = groups.sum(loss_mask.to(logps.dtype))
    per_group = groups.sum(-logps * w * loss_mask) / n.clamp(min=1)
    keep = n > 0  # padding segments / rows train nothing
    return per_group[keep], est, xhat


def run_variant(position_embedding_type: str, packed: Batch, unpacked: list, vocab: int) -> dict:
    b, s = packed.shape
    model_parallel_seed(1, PLATFORM)
    (model,) = build_gpt_chunks(
        ModelConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            vocab_size=vocab,
            make_vocab_size_divisible_by=8,
            max_position_embeddings=s,
            ffn_hidden_size=64,
            position_embedding_type=position_embedding_type,
        ),
        ParallelConfig(),
        PLATFORM,
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def grads_of(loss):
        for p in params:
            p.grad = None
        loss.backward()
        return [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params
        ]

    # Reference: every sample alone in its own (padded, unpacked) row, gradients accumulated.
    ref_losses, ref_grads = [], [torch.zeros_like(p) for p in params]
    for batch in unpacked:
        losses, _, _ = ift_step(model, batch, causal_attention_mask(1, s), vocab)
        ref_losses.append(losses)
        for acc, g in zip(ref_grads, grads_of(losses.sum())):
            acc += g
    ref_losses = torch.cat(ref_losses)
    mask = packed_attention_mask(packed.segment_ids)
    out = {}

    def compare(name, **kw):
        losses, _, _ = ift_step(model, packed, kw.pop("mask", mask), vocab, **kw)
        grads = grads_of(losses.sum())
        same_shape = losses.shape == ref_losses.shape
        out[name] = {
            "num_samples": int(losses.numel()),
            "loss_max_abs": float((losses - ref_losses).abs().max())
            if same_shape
            else float("inf"),
            "loss_ref_max": float(ref_losses.abs().max()),
            "grad_max_abs": max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads)),
            "grad_ref_max": max(float(r.abs().max()) for r in ref_grads),
        }

    compare("segment_positions")
    compare("global_positions", global_positions=True)
    # Negative control: a plain causal mask lets packed samples attend to each other.
    compare("causal_mask_only", mask=causal_attention_mask(b, s))
    out["reference_samples"] = int(ref_losses.numel())
    return out


def main(in_path: str, out_path: str) -> None:
    """Read the batches the test prepared (``torch.save``), write the comparison as JSON."""
    inputs = torch.load(in_path)
    packed = Batch(**inputs["packed"])
    unpacked = [Batch(**u) for u in inputs["unpacked"]]
    init_distributed(ParallelConfig(), PLATFORM)
    try:
        results = {
            t: run_variant(t, packed, unpacked, inputs["vocab"])
            for t in ("rope", "learned_absolute")
        }
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
