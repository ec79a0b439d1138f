"""Where a run's metrics go: a line on stdout, ``metrics.jsonl``, tensorboard and a progress bar.

Rank 0 writes; the other ranks' :class:`MetricsLogger` does nothing (every metric is already
reduced over the ranks by the step).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from megatron_ift.platform import Platform
from megatron_ift.training import metrics
from megatron_ift.training.config import RunConfig
from megatron_ift.training.step_metrics import StepMetrics
from megatron_ift.training.stragglers import Spread


class MetricsLogger:
    """Reports steps and evaluations of one run (one instance per process; :meth:`close` it).

    Args:
        cfg: the run's config (``logging.*``, the run folder, shapes for throughput).
        platform: the device (MFU only on a GPU; peak memory).
        start_step: the step the run starts or resumes at (tensorboard drops later events of
            an earlier attempt; the bar starts there).
        rank0: whether this process writes.
        world_size: processes sharing a step (throughput per GPU).
    """

    def __init__(self, cfg: RunConfig, platform: Platform, *, start_step: int, rank0: bool,
                 world_size: int) -> None:
        self.cfg, self.platform = cfg, platform
        self.rank0, self.world_size = rank0, world_size
        self.writer: Optional[SummaryWriter] = None
        self.bar: Optional[tqdm] = None
        self.jsonl = os.path.join(cfg.checkpoint.dir, "metrics.jsonl")
        if not rank0:
            return
        if cfg.logging.tensorboard:
            self.writer = SummaryWriter(os.path.join(cfg.checkpoint.dir, "tensorboard"),
                                        purge_step=start_step)
        if cfg.logging.progress_bar and sys.stdout.isatty():
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log_step(self, step: int, m: StepMetrics, *, grad_norm: Optional[float], step_time: float,
                 lr: float, loss_scale: Optional[float] = None,
                 spread: Optional[Spread] = None) -> dict[str, float]:
        """Report optimizer step ``step`` (1-based); returns the record written to
        ``metrics.jsonl`` (without ``step``). ``spread``: the ranks' compute-time spread, on the
        steps it was gathered."""
        cfg = self.cfg
        record: dict[str, Any] = m.as_dict()
        rates = metrics.throughput(
            cfg.model, global_batch_size=cfg.train.global_batch_size, seq_length=cfg.data.seq_length,
            seconds=step_time, world_size=self.world_size, estimation_pass=m.lam > 0,
            full_recompute=cfg.train.recompute == "full", peak_tflops=cfg.logging.peak_tflops,
        )
        if not self.platform.cuda:
            del rates["mfu"]  # a GPU's peak says nothing about a CPU run
        record.update(rates, lr=lr, grad_norm=float("nan") if grad_norm is None else float(grad_norm),
                      step_time=step_time, peak_memory_gb=self.platform.peak_memory_gb())
        if loss_scale is not None:
            record["loss_scale"] = float(loss_scale)
        if spread is not None:
            record.update(spread.as_dict())
        if not self.rank0:
            return record
        if spread is not None:
            print(f"step {step}: compute time per step over ranks min {spread.min:.3f} s, median "
                  f"{spread.median:.3f} s, max {spread.max:.3f} s (rank {spread.slowest_rank} on "
                  f"{spread.slowest_host})", flush=True)
            if spread.factor > cfg.logging.straggler_factor:
                print(f"straggler: rank {spread.slowest_rank} on {spread.slowest_host} takes "
                      f"{spread.factor:.2f}x the median compute time per step (limit "
                      f"{cfg.logging.straggler_factor}x)", flush=True)
        self._scalars("train", record, step)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m.loss:.4f}", lam=f"{m.lam:.3f}")
        if step % cfg.logging.log_interval == 0 or step == cfg.train.steps:
            print(
                f"step {step}/{cfg.train.steps} loss {m.loss:.4f} loss_sft {m.loss_sft:.4f} "
                f"lambda {m.lam:.3f} est_acc {m.estimate_accuracy:.3f} lr {lr:.2e} "
                f"grad_norm {record['grad_norm']:.3f} {record['tokens_per_second']:.0f} tok/s "
                f"{step_time * 1000:.0f} ms", flush=True,
            )
        return record

    def log_eval(self, step: int, result: dict[str, float]) -> None:
        """Report an evaluation (``eval/...`` keys)."""
        if not self.rank0:
            return
        print(f"eval step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items()), flush=True)
        if self.writer:
            for k, v in result.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        """Flush and close the writer and the bar (idempotent)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _scalars(self, prefix: str, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
