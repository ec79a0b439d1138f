"""``megatron-ift train`` whose step raises an unexpected error at step 1 (after step 0 and a
save): the entry point's try/finally must still release the run folder's lock, close the
tensorboard writer and destroy the process groups. Prints one JSON line with what it saw.

Test instrumentation only: the step and the writer are wrapped here, never in the product.
"""

import json
import os
import sys

from megatron_ift.training import logger as logger_module
from megatron_ift.training import step as step_module

closed = []


class RecordingWriter(logger_module.SummaryWriter):
    def close(self):
        closed.append(True)
        super().close()


real_call = step_module.IFTStep.__call__


def failing_call(self, batches, step, **kwargs):
    if step >= 1 and not kwargs.get("forward_only"):
        raise RuntimeError("injected failure inside step 1")
    return real_call(self, batches, step, **kwargs)


logger_module.SummaryWriter = RecordingWriter
step_module.IFTStep.__call__ = failing_call


def main(argv):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ift import train

    run = next(a.split("=", 1)[1] for a in argv if a.startswith("checkpoint.dir="))
    try:
        train.main(argv)
        raised = None
    except RuntimeError as exc:
        raised = str(exc)
    print(json.dumps({
        "raised": raised, "writer_closed": len(closed),
        "dist_initialized": dist.is_initialized(),
        "model_parallel_initialized": parallel_state.model_parallel_is_initialized(),
        "lock_exists": os.path.exists(os.path.join(run, "run.lock")),
        "rank": int(os.environ.get("RANK", "0")),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
