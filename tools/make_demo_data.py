#!/usr/bin/env python
"""Regenerate the shipped demo data in ``data/`` (deterministic; see megatron_ift/data/demo.py)."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ift.data.demo import SEED, make_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for path in make_demo_data(os.path.normpath(args.out), seed=args.seed):
        print(f"{os.path.getsize(path):>9,d}  {path}")


if __name__ == "__main__":
    main()
