"""``megatron-ift train --config FILE.yaml [section.key=value ...]`` (also ``python -m``).

parse -> load the config (no megatron-core yet: a bad key is refused at once) -> bootstrap the
platform -> ``Trainer.setup() / train() / close()``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_ift.errors import TrainingDiverged, run_cli
from megatron_ift.platform import bootstrap
from megatron_ift.training.config import load_run_config


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-ift train", description=__doc__)
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of refusals (also MEGATRON_IFT_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)

    cfg = load_run_config(args.config, args.overrides)
    platform = bootstrap()
    # After the bootstrap: the trainer imports megatron-core, which the CPU layer imports itself
    # (with its fusion kernels uncompiled) when the run computes on the CPU.
    from megatron_ift.training.trainer import Trainer

    trainer = Trainer(cfg, platform, config_path=args.config)
    try:
        trainer.setup()
        return trainer.train()
    except FloatingPointError as exc:  # the non-finite policy stopped the run
        if isinstance(exc, TrainingDiverged):
            raise
        raise TrainingDiverged(str(exc)) from exc
    finally:
        trainer.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``megatron-ift train``; returns the exit status (see ``megatron_ift.errors``)."""
    return run_cli("megatron-ift train", _train, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
