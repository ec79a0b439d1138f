"""Activation recomputation (selective, full) with dropout on: the same loss and gradients as
no recomputation, at TP 2 (megatron-core's RNG tracker runs on the CPU generator)."""

import sys

from common import PLATFORM, dump, make_global_batch, setup, split_microbatches, tiny_model
from megatron_ift.distributed import model_parallel_seed

import torch
from megatron.core import parallel_state

from megatron_ift.checkpoint.model_io import unwrap
from megatron_ift.ift import IFTConfig
from megatron_ift.training.engine import build_model
from megatron_ift.training.step import IFTStep


def run(par, overrides, dropout_seed=9):
    cfg = tiny_model(hidden_dropout=0.1, attention_dropout=0.1)
    model_parallel_seed(5, PLATFORM)
    chunks, _ = build_model(cfg, par, PLATFORM, transformer_overrides=overrides)
    batch = make_global_batch(4, 16, cfg.vocab_size, seed=2)
    mbs = split_microbatches(batch, parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size(), 2)
    step = IFTStep(chunks, IFTConfig(), cfg.vocab_size, seq_length=16, micro_batch_size=2,
                   platform=PLATFORM)
    for c in chunks:
        c.zero_grad_buffer()
    model_parallel_seed(dropout_seed, PLATFORM)  # same dropout stream for every variant
    out = step(mbs, step=0)
    grads = [p.main_grad.clone() for c in chunks for p in unwrap(c).parameters()]
    return out.loss, grads


def main():
    out_path = sys.argv[1]
    par = setup(tp=2)
    base_loss, base = run(par, {})
    report = {"base": base_loss}
    for name, ov in {
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }.items():
        loss, grads = run(par, ov)
        report[name] = loss
        report[name + "_grads_equal"] = all(torch.equal(a, b) for a, b in zip(base, grads))
    # dropout is really on: another dropout stream changes the loss
    report["other_dropout_stream"] = run(par, {}, dropout_seed=10)[0]
    dump(out_path, report)


if __name__ == "__main__":
    main()
