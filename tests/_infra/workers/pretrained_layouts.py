"""Load real checkpoints (SmolLM2) at several TP/PP layouts for logits, then run
``megatron-ift generate`` in the same processes.

Usage: ``pretrained_layouts.py SPEC.json`` under torchrun; the world size must be divisible by
every layout's TP x PP (the rest is data parallelism). SPEC::

    {"layouts": [{"tp": 3, "pp": 2,
                  "logits": [{"ckpt": dir, "tokens": file.pt, "out": file.pt}]}],
     "generate_args": [arguments of megatron-ift generate] or null}

``out`` receives the full padded-vocabulary logits ``[b, s, v]``. ``generate_args`` runs last (its
``--tp`` x ``--pp`` must equal the world size); the command builds its own model-parallel groups
and tears everything down.
"""

import json
import sys

if __name__ == "__main__":
    from convert_common import pipeline_logits
    from common import PLATFORM, setup

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ift.inference.loading import load_for_inference

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for n, lay in enumerate(spec["layouts"]):
        if n:
            parallel_state.destroy_model_parallel()
        par = setup(tp=lay["tp"], pp=lay["pp"], seed=7)
        first_dp = parallel_state.get_data_parallel_rank() == 0
        for job in lay["logits"]:
            model, cfg, _ = load_for_inference(job["ckpt"], par, PLATFORM)
            logits = pipeline_logits(model, torch.load(job["tokens"]), cfg.hidden_size, lay["pp"])
            if logits is not None and first_dp:
                torch.save(logits, job["out"])
            dist.barrier()
    if spec.get("generate_args"):
        from megatron_ift.inference import cli

        parallel_state.destroy_model_parallel()
        if cli.main(spec["generate_args"]) != 0:
            raise SystemExit("megatron-ift generate failed")
