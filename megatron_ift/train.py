"""``megatron-ift train --config FILE.yaml [section.key=value ...]`` (also ``python -m``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-ift train", description=__doc__)
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)

    from megatron_ift.parallel import use_cpu_compat_without_cuda

    use_cpu_compat_without_cuda()  # before megatron-core is imported
    from megatron_ift.training.config import load_run_config
    from megatron_ift.training.loop import Trainer
    from megatron_ift.validation import ConfigError

    try:
        cfg = load_run_config(args.config, args.overrides)
        trainer = Trainer(cfg)
    except ConfigError as exc:
        print(f"megatron-ift train: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return trainer.run()
    finally:
        from megatron_ift.parallel import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
