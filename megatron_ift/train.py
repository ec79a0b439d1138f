"""``megatron-ift train --config FILE.yaml [section.key=value ...]`` (also ``python -m``).

parse -> load the config (no megatron-core yet: a bad key is refused at once) -> bootstrap the
platform -> ``Trainer.setup() / train() / close()``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_ift.errors import MegatronIFTError, RankLost, StorageError, TrainingDiverged, run_cli
from megatron_ift.platform import bootstrap
from megatron_ift.training import storage
from megatron_ift.training.config import load_run_config
from megatron_ift.training.heartbeat import is_peer_failure

#: Seconds a failed collective waits for the heartbeats to tell which peer is gone.
PEER_WAIT_S = 15.0


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
    except MegatronIFTError:
        raise
    except FloatingPointError as exc:  # the non-finite policy stopped the run
        raise TrainingDiverged(str(exc)) from exc
    except OSError as exc:
        fault = storage.storage_oserror(exc)
        if fault is None:
            raise
        raise StorageError(f"writing {storage.describe(fault)}; the previous complete checkpoint "
                           "stays latest; fix the storage, then run again to resume") from exc
    except Exception as exc:
        if not is_peer_failure(exc):
            raise
        # A collective that failed because a peer went away: name it (its heartbeats lapse).
        missing = trainer.missing_peers(wait_s=PEER_WAIT_S)
        if not missing:
            raise
        dump = trainer.watchdog.record(f"{type(exc).__name__}: {exc}")
        raise RankLost(f"rank {trainer.watchdog.rank} in {trainer.watchdog.where}: {missing} "
                       f"({type(exc).__name__} in a collective); stacks in {dump}; a requeue resumes "
                       "from the latest complete checkpoint") from exc
    finally:
        trainer.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``megatron-ift train``; returns the exit status (see ``megatron_ift.errors``)."""
    return run_cli("megatron-ift train", _train, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
