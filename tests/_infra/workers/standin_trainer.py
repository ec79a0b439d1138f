"""A stand-in for ``python -m megatron_ift.train`` that obeys the same launch contract, fast.

The launch and Slurm tests use it to check the harness (rendezvous, signal forwarding, requeue,
resume) independently of the real trainer. The contract it implements:

* ``--config FILE [dotted.key=value ...]``; reads ``checkpoint.dir``, ``train.steps``,
  ``checkpoint.save_interval`` and ``standin.step_seconds`` (YAML file, then overrides).
* Resumes from the latest checkpoint in ``checkpoint.dir`` and prints
  ``resumed from DIR at step N``; logs ``step N/STEPS`` (rank 0), like the real trainer.
* On SIGTERM or SIGUSR1: saves the current step on every rank, prints
  ``preempted: saved checkpoint at step N`` and exits 0. All ranks agree on the step through an
  all-reduce of the flag, as a real trainer must (ranks receive the signal at different times).
* At ``train.steps``: writes ``checkpoint.dir/COMPLETED`` and exits 0.

Every step all-reduces over gloo, so a wrong world size or rendezvous fails or hangs here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

_STOP = {"signal": None}


def _on_signal(signum, _frame) -> None:
    # Idempotent: the flag is read at the next step boundary; a second signal changes nothing.
    _STOP["signal"] = signal.Signals(signum).name


def _config(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    flat: dict = {}

    def flatten(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                flatten(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    flatten("", yaml.safe_load(Path(args.config).read_text()) or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not dotted.key=value")
        flat[key] = yaml.safe_load(value)
    return flat


def _latest_step(ckpt: Path) -> int:
    marker = ckpt / "latest_step"
    return int(marker.read_text()) if marker.exists() else 0


def _say(line: str) -> None:
    """One write() per line: both ranks share stdout, and print() may split a line from its
    newline (unbuffered output), letting the other rank's line land in between."""
    os.write(1, (line + "\n").encode())


def _save(ckpt: Path, step: int, rank: int, state: float) -> None:
    folder = ckpt / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps({"step": step, "state": state}))
    dist.barrier()  # every rank's shard is on disk before the step is declared the latest
    if rank == 0:
        tmp = ckpt / "latest_step.tmp"
        tmp.write_text(str(step))
        tmp.replace(ckpt / "latest_step")
    dist.barrier()


def main(argv: list[str]) -> int:
    cfg = _config(argv)
    ckpt = Path(cfg["checkpoint.dir"])
    steps = int(cfg.get("train.steps", 10))
    interval = int(cfg.get("checkpoint.save_interval", 0) or 0)
    step_seconds = float(cfg.get("standin.step_seconds", 0.1))
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = int(os.environ["WORLD_SIZE"])
    assert world == expected, f"world size {world} != WORLD_SIZE {expected}"
    ckpt.mkdir(parents=True, exist_ok=True)
    step = _latest_step(ckpt)
    state = 0.0
    if step:
        state = json.loads((ckpt / f"step_{step:06d}" / f"rank{rank}.json").read_text())["state"]
        _say(f"[rank {rank}] resumed from {ckpt} at step {step}")
    else:
        _say(f"[rank {rank}] starting from scratch (world size {world})")

    while step < steps:
        time.sleep(step_seconds)
        value = torch.tensor([float(step + 1)])
        dist.all_reduce(value)
        state += value.item()
        step += 1
        if rank == 0:
            _say(f"step {step}/{steps}")
        stop = torch.tensor([1.0 if _STOP["signal"] else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() and step < steps:
            _save(ckpt, step, rank, state)
            _say(f"[rank {rank}] preempted: saved checkpoint at step {step}")
            dist.destroy_process_group()
            return 0
        if interval and step % interval == 0:
            _save(ckpt, step, rank, state)

    _save(ckpt, step, rank, state)
    if rank == 0:
        (ckpt / "COMPLETED").write_text(f"{step}\n")
        _say(f"training complete at step {step}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
