#!/usr/bin/env python
"""Tokenise JSON Lines text into Megatron indexed .bin/.idx files.

Thin wrapper: see megatron_ift/data/preprocess.py for the options and behaviour.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ift.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
