"""Host syncs per IFT step on the emulated GPU, for 2 and 4 micro-batches (same global batch).

Prints one JSON line: {estimator: {"syncs": {"<m>": [per-step counts]}, "eval": count}} for
the estimators named on the command line. A sync inside a
micro-batch loop raises (the step declares its loops sync-free), so reaching the print means
the loops have none; the counts show what is left per step.
"""

import json
import sys

from megatron_ift import emulated_cuda
from megatron_ift.platform import bootstrap

bootstrap(emulate="1")

from common import PLATFORM, make_global_batch, setup, split_microbatches, tiny_model  # noqa: E402

from megatron_ift.ift import IFTConfig  # noqa: E402
from megatron_ift.training.engine import OptimizerConfig, build_model, build_optimizer  # noqa: E402
from megatron_ift.training.step import IFTStep  # noqa: E402


def main() -> None:
    par = setup()
    model = tiny_model()
    chunks, tconfig = build_model(model, par, PLATFORM)
    optimizer = build_optimizer(chunks, OptimizerConfig(lr=1e-3), model, par, tconfig)
    batch = make_global_batch(8, 16, model.vocab_size, seed=3)
    print(json.dumps({e: count(e, chunks, optimizer, model, batch) for e in sys.argv[1:]}), flush=True)


def count(estimator, chunks, optimizer, model, batch) -> dict:
    extra = {"top_p": 0.9} if estimator == "top_p" else {}
    counts = {}
    for m in (2, 4):
        step_fn = IFTStep(chunks, IFTConfig(estimator=estimator, **extra), model.vocab_size, seq_length=16,
                          micro_batch_size=8 // m, platform=PLATFORM)
        mbs = split_microbatches(batch, 0, 1, 8 // m)
        counts[str(m)] = []
        for step in range(2):
            for c in chunks:
                c.zero_grad_buffer()
            before = emulated_cuda.host_syncs()
            step_fn(mbs, step)
            counts[str(m)].append(emulated_cuda.host_syncs() - before)
        optimizer.zero_grad()
    before = emulated_cuda.host_syncs()
    step_fn(mbs, 0, forward_only=True)
    return {"syncs": counts, "eval": emulated_cuda.host_syncs() - before}


if __name__ == "__main__":
    main()
