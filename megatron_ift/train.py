"""``megatron-ift train --config FILE.yaml [section.key=value ...]`` (also ``python -m``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_ift.errors import TrainingDiverged, run_cli


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-ift train", description=__doc__)
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of refusals (also MEGATRON_IFT_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)

    from megatron_ift.parallel import destroy_distributed
    from megatron_ift.training.config import load_run_config
    from megatron_ift.training.loop import Trainer

    cfg = load_run_config(args.config, args.overrides)
    trainer = Trainer(cfg, config_path=args.config)
    try:
        return trainer.run()
    except FloatingPointError as exc:  # the non-finite policy stopped the run
        if isinstance(exc, TrainingDiverged):
            raise
        raise TrainingDiverged(str(exc)) from exc
    finally:
        trainer.release()
        destroy_distributed()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``megatron-ift train``; returns the exit status (see ``megatron_ift.errors``)."""
    return run_cli("megatron-ift train", _train, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
