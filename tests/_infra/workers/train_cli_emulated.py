"""``megatron_ift.train.main`` on the emulated CUDA device (see megatron_ift.emulated_cuda):
``MEGATRON_IFT_EMULATE_CUDA=1``, which the entry point's platform bootstrap reads, so every code
path takes its GPU branch and the run fails where a real GPU would (host tensors meeting device
tensors or NCCL, host syncs inside the micro-batch loop).
"""

import os
import sys

os.environ.setdefault("MEGATRON_IFT_EMULATE_CUDA", "1")

from megatron_ift.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
