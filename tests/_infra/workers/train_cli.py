"""Runs ``megatron_ift.train.main`` under torchrun (the entry point tests launch)."""

import sys

from megatron_ift.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
