#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron-ift (see docs/conversion.md).

    python tools/convert_checkpoint.py import-hf HF_DIR OUT_DIR
    python tools/convert_checkpoint.py export-hf CHECKPOINT OUT_DIR
    python tools/convert_checkpoint.py gguf-to-hf FILE.gguf OUT_DIR    (or --smollm2 OUT_DIR)
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_ift.convert.cli import main

    sys.exit(main(prog="convert_checkpoint.py"))
