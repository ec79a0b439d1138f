"""lambda = 0, gamma = 0 (live embeddings): the IFT step equals megatron-core's own SFT step
(GPTModel's built-in vocab-parallel cross-entropy through the same schedule), to float32
rounding: the step runs the output layer on trained positions only, fused with the log-probs."""

import json
import sys

from common import PLATFORM, dump, make_global_batch, setup, split_microbatches, tiny_model

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ift.checkpoint.model_io import unwrap
from megatron_ift.ift import IFTConfig
from megatron_ift.training.engine import build_model
from megatron_ift.training.step import IFTStep


def megatron_sft_forward(data_iterator, model):
    mb = next(data_iterator)
    per_token = model(mb.tokens, mb.position_ids, None, labels=mb.labels)  # [b, s]
    mask = mb.loss_mask

    def loss_func(output):
        total = (output.float() * mask).sum()
        return total, mask.sum().to(torch.int), {"loss": total.detach()}

    return per_token, loss_func


def grads(chunks):
    return [p.main_grad.clone() for c in chunks for p in unwrap(c).parameters()]


def main():
    run(json.loads(sys.argv[1]))


def run(opts):
    """Both steps at ``opts["tp"]``; writes the comparison to ``opts["out"]``."""
    par = setup(tp=opts["tp"])  # pipeline size 1: every rank holds the loss
    model_cfg = tiny_model()
    chunks, config = build_model(model_cfg, par, PLATFORM)
    batch = make_global_batch(8, 16, model_cfg.vocab_size, seed=1)
    mbs = split_microbatches(batch, parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size(), 2)
    step = IFTStep(chunks, IFTConfig(max_lambda=0.0, gamma=0.0, aggregation="token_mean"),
                   model_cfg.vocab_size, seq_length=16, micro_batch_size=2, platform=PLATFORM)
    for c in chunks:
        c.zero_grad_buffer()
    ours = step(mbs, step=0)
    g_ours = grads(chunks)
    for c in chunks:
        c.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=megatron_sft_forward, data_iterator=iter(mbs), model=chunks,
        num_microbatches=len(mbs), seq_length=16, micro_batch_size=2,
    )
    g_ref = grads(chunks)
    same = all(torch.equal(a, b) for a, b in zip(g_ours, g_ref))
    tot = sum(float(r["loss"]) for r in reports)
    dump(opts["out"], {
        "ours": ours.loss,
        "megatron": tot / float(sum(mb.loss_mask.sum() for mb in mbs)),
        "grads_equal": same,
        # largest gradient difference relative to its tensor's largest entry
        "grad_rel_err": max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                            for a, b in zip(g_ours, g_ref)),
        "max_grad": max(float(g.abs().max()) for g in g_ref),
    })


if __name__ == "__main__":
    main()
