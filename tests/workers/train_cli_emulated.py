"""``megatron_ift.train.main`` on the emulated CUDA device (see megatron_ift.emulated_cuda).

The emulation is switched on before anything imports megatron-core, so every code path takes its
GPU branch; the run fails where a real GPU would (host tensors meeting device tensors or NCCL,
host syncs inside the micro-batch loop).
"""

import sys

from megatron_ift import emulated_cuda

emulated_cuda.enable()

from megatron_ift.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
