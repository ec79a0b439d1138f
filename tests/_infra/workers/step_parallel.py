"""One IFT step at a parallel layout from the reference's initial weights; compares the loss,
every gradient and every parameter after one optimizer step with the single-process reference
(loaded into this layout through dist_checkpointing's resharding).

``argv[1]`` is a JSON list of specs run one after another in this launch (one launch per world
size saves a process start per layout), each with its ``kind``: ``layout`` (:func:`run`),
``reference`` (``step_reference.reference_step`` on data-parallel replicas) or ``sft_exact``
(``sft_exact.run``). Each spec writes its own result file, so the test can tell which spec a
failed launch stopped at.
"""

import json
import os
import sys

from common import PLATFORM, dump, make_global_batch, setup, split_microbatches, tiny_model

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ift.checkpoint.model_io import load_model, unwrap
from megatron_ift.ift import IFTConfig
from megatron_ift.models.gpt import build_gpt_chunks
from megatron_ift.training.engine import OptimizerConfig, build_model, build_optimizer
from megatron_ift.training.step import IFTStep


def _errors(chunks, expected_chunks, use_grad: bool) -> dict:
    """Per-parameter max |ours - ref| and max |ref| on this rank's shards."""
    out = {}
    pp = parallel_state.get_pipeline_model_parallel_rank()
    for ci, (c, e) in enumerate(zip(chunks, expected_chunks)):
        ref = dict(e.named_parameters())
        for name, p in unwrap(c).named_parameters():
            if use_grad:  # a frozen parameter has no main_grad: its gradient is zero
                ours = p.main_grad if p.requires_grad else torch.zeros_like(p)
            else:
                ours = p.data
            r = ref[name].data
            out[f"pp{pp}.vp{ci}.{name}"] = (float((ours.float() - r).abs().max()), float(r.abs().max()))
    return out


def _gather(d: dict) -> dict:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, d)
    merged = {}
    for part in parts:
        for k, (diff, scale) in part.items():
            od, os_ = merged.get(k, (0.0, 0.0))
            merged[k] = (max(od, diff), max(os_, scale))
    return merged


def main():
    """Runs every spec of the JSON list in argv[1], one after another in this world."""
    import sft_exact
    import step_reference

    for i, opts in enumerate(json.loads(sys.argv[1])):
        if i:
            parallel_state.destroy_model_parallel()
        kind = opts.get("kind", "layout")
        if kind == "reference":
            step_reference.reference_step(opts, setup())
        elif kind == "sft_exact":
            sft_exact.run(opts)
        else:
            run(opts)


def run(opts):
    ref, out = opts["ref"], opts["out"]
    par = setup(
        tp=opts["tp"], pp=opts["pp"], vpp=opts.get("vpp"), sp=opts.get("sp", False),
        context_parallel_size=opts.get("cp", 1), use_distributed_optimizer=opts.get("distopt", False),
    )
    model_cfg = tiny_model(**opts.get("model", {}))
    ift = IFTConfig(**opts["ift"])
    chunks, config = build_model(model_cfg, par, PLATFORM, mixing_embeddings=ift.mixing_embeddings)
    load_model(chunks, os.path.join(ref, "init"))
    optimizer = build_optimizer(chunks, OptimizerConfig(**opts["optim"]), model_cfg, par, config)

    batch = make_global_batch(opts["global_batch"], opts["seq"], model_cfg.vocab_size, seed=opts["seed"],
                              packed=opts.get("packed", False), multi_turn=opts.get("multi_turn", False))
    mbs = split_microbatches(
        batch, parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(), opts["mbs"],
    )
    step = IFTStep(chunks, ift, model_cfg.vocab_size, seq_length=opts["seq"], micro_batch_size=opts["mbs"],
                   platform=PLATFORM)
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    result = step(mbs, step=0)

    # A second, bare copy of the model at this layout holds the reference tensors.
    expected = build_gpt_chunks(model_cfg, par, PLATFORM)
    report = {"loss": result.loss, "metrics": result.as_dict()}
    if not par.use_distributed_optimizer:  # with ZeRO each rank holds only its grad shard
        load_model(expected, os.path.join(ref, "grads"))
        report["grads"] = _gather(_errors(chunks, expected, use_grad=True))
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step was skipped"
    load_model(expected, os.path.join(ref, "params"))
    report["params"] = _gather(_errors(chunks, expected, use_grad=False))
    report["grad_norm"] = grad_norm
    os.makedirs(out, exist_ok=True) if dist.get_rank() == 0 else None
    dump(os.path.join(out, "result.json"), report)


if __name__ == "__main__":
    main()
