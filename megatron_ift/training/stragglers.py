"""Stragglers: the spread of the ranks' compute time per step, and which rank is slow.

Every rank's step takes as long as the slowest one's (the gradient synchronisation waits for
it), so the step time says nothing about who is slow. What differs is the time from the start of
a step to the moment the rank itself reaches the data-parallel gradient synchronisation
(megatron-core's ``finalize_model_grads``): its own forward and backward passes. On a GPU that
moment is read from CUDA events at the step boundary, which already synchronises once.

Every ``logging.straggler_interval`` steps the ranks' averages over those steps are gathered once
over a gloo group of the whole job (host floats, no device work) and logged as min / median /
max, naming the slowest rank when it is more than ``logging.straggler_factor`` times the median.
"""

from __future__ import annotations

import functools
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_ift.platform import Platform


@dataclass(frozen=True)
class Spread:
    """The ranks' mean compute seconds per step over an interval."""

    min: float
    median: float
    max: float
    slowest_rank: int
    slowest_host: str
    factor: float
    """``max / median``."""

    def as_dict(self) -> dict[str, float]:
        return {"compute_time_min": self.min, "compute_time_median": self.median,
                "compute_time_max": self.max, "slowest_rank": self.slowest_rank,
                "slowest_factor": self.factor}


class StragglerMonitor:
    """Times each rank's compute per step and gathers the spread every ``interval`` steps.

    Args:
        platform: a real GPU's compute is timed with CUDA events.
        interval: steps between two gathers (0: off).
        group: a gloo group of every rank (``dist.new_group(backend="gloo")``).
    """

    def __init__(self, platform: Platform, interval: int, group: Optional[dist.ProcessGroup]) -> None:
        self.platform, self.interval, self.group = platform, interval, group
        self._total = 0.0
        self._steps = 0
        self._start: Optional[float] = None
        self._reached: Optional[float] = None
        self._events = None

    def wrap_finalize(self, finalize: Callable) -> Callable:
        """``finalize`` (megatron-core's ``finalize_model_grads``) that first records when this
        rank reached it."""

        @functools.wraps(finalize)
        def wrapper(*args, **kwargs):
            self._mark_reached()
            return finalize(*args, **kwargs)

        return wrapper

    def step_started(self) -> None:
        self._reached = None
        if self.platform.real_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, end)
        else:
            self._start = time.perf_counter()

    def _mark_reached(self) -> None:
        if self._events is not None:
            self._events[1].record()
            self._reached = 0.0  # read at step_finished, after the step's synchronisation
        elif self._start is not None:
            self._reached = time.perf_counter() - self._start

    def step_finished(self, step: int) -> Optional[Spread]:
        """Account this step (after its one host synchronisation); every ``interval`` steps,
        the gathered spread (a collective: every rank calls it at the same steps)."""
        if self._events is not None and self._reached is not None:
            self._reached = self._events[0].elapsed_time(self._events[1]) / 1000.0
        if self._reached is not None:
            self._total += self._reached
            self._steps += 1
        if not self.interval or step % self.interval or self.group is None:
            return None
        mine = self._total / max(self._steps, 1)
        self._total, self._steps = 0.0, 0
        every = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(every, (mine, socket.gethostname()), group=self.group)
        times = [float(t) for t, _ in every]
        median = statistics.median(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        return Spread(min=min(times), median=median, max=times[slowest], slowest_rank=slowest,
                      slowest_host=every[slowest][1],
                      factor=times[slowest] / median if median > 0 else 1.0)
