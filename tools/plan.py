#!/usr/bin/env python3
"""Plan a parallel layout (``megatron-ift plan``): see ``megatron_ift/planning/cli.py``.

    python tools/plan.py --preset llama3-70b --nodes 8 --gpus-per-node 8 --seq-length 4096
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ift.planning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
