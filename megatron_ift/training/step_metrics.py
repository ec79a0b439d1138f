"""What a step measures: device-side partial sums per micro-batch, one reduction, host metrics.

The micro-batch loops never read a value on the host: every loss function (and the estimation
pass's collector) returns a :class:`StepSums` of device scalars; the step adds them up and
reduces them once (:meth:`StepSums.reduce`: one packed tensor, one all-reduce per group, one read),
which yields the host :class:`StepMetrics`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class StepSums:
    """Sums over micro-batches (and, after :meth:`reduce`, over ranks): 0-d device tensors.

    A field left None counts as zero; every field but ``weight_max`` is summed, ``weight_max``
    takes the maximum.
    """

    loss_sum: Optional[torch.Tensor] = None
    """The optimised loss's sum (its aggregation: per sample or per token)."""
    count: Optional[torch.Tensor] = None
    """Its count: the loss is ``loss_sum / count``."""
    mixed_sft_sum: Optional[torch.Tensor] = None
    """Unweighted loss of the optimisation pass (mixed input), same aggregation."""
    weight_entropy_sum: Optional[torch.Tensor] = None
    """Sum over samples of the entropy of ``w / n``."""
    num_samples: Optional[torch.Tensor] = None
    """Samples with at least one trained token."""
    num_tokens: Optional[torch.Tensor] = None
    """Trained tokens."""
    sft_sum: Optional[torch.Tensor] = None
    """SFT loss of the ground-truth input (the estimation pass), sum."""
    sft_count: Optional[torch.Tensor] = None
    """Its count."""
    est_correct: Optional[torch.Tensor] = None
    """Trained tokens whose estimate equals the label."""
    est_total: Optional[torch.Tensor] = None
    """Trained tokens estimated."""
    weight_max: Optional[torch.Tensor] = None
    """Largest propagation weight (a maximum, not a sum)."""

    def __iadd__(self, other: "StepSums") -> "StepSums":
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if theirs is None:
                continue
            theirs = theirs.detach().to(torch.float64)
            if mine is None:
                setattr(self, f.name, theirs)
            elif f.name == "weight_max":
                setattr(self, f.name, torch.maximum(mine, theirs))
            else:
                setattr(self, f.name, mine + theirs)
        return self

    def reduce(self, groups: Sequence[Optional[dist.ProcessGroup]], device: torch.device,
               lam: float) -> "StepMetrics":
        """Sum (``weight_max``: maximum) over ``groups`` and read the result on the host: the one
        host synchronisation of a step.

        Args:
            groups: the process groups to reduce over (pipeline: only the last stage holds
                values; data-parallel replicas); a None entry is skipped.
            device: where the packed tensor lives (the compute device: NCCL takes no host
                tensors).
            lam: the step's lambda (reported as is).
        """
        names = [f.name for f in dataclasses.fields(self) if f.name != "weight_max"]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        packed = torch.stack([getattr(self, n) if getattr(self, n) is not None else zero for n in names])
        wmax = (self.weight_max if self.weight_max is not None else zero).reshape(1)
        if dist.is_initialized():
            for g in groups:
                if g is not None:
                    dist.all_reduce(packed, group=g)
                    dist.all_reduce(wmax, op=dist.ReduceOp.MAX, group=g)
        *values, weight_max = torch.cat([packed, wmax]).tolist()
        return StepMetrics.from_sums(dict(zip(names, values)), weight_max=weight_max, lam=lam)


@dataclass(frozen=True)
class StepMetrics:
    """A step's metrics on the host, identical on every rank."""

    loss: float
    """The IFT loss of the global batch."""
    loss_sft: float
    """SFT loss of the ground-truth input (estimation pass; the optimisation pass when lambda = 0)."""
    loss_mixed_sft: float
    """Unweighted loss of the optimisation pass (mixed input)."""
    lam: float
    """Lambda of the step."""
    estimate_accuracy: float
    """Fraction of trained tokens whose estimate equals the label (NaN without estimation)."""
    weight_max: float
    """Largest propagation weight."""
    weight_entropy: float
    """Mean over samples of the entropy of ``w / n``."""
    num_samples: float
    """Samples with at least one trained token."""
    num_tokens: float
    """Trained tokens."""
    loss_sum: float
    """Raw sums, for exact aggregation over several steps (evaluation)."""
    count: float
    sft_sum: float
    sft_count: float

    @staticmethod
    def from_sums(s: dict[str, float], *, weight_max: float, lam: float) -> "StepMetrics":
        """Metrics from reduced :class:`StepSums` values (by field name)."""
        count = max(s["count"], 1.0)
        return StepMetrics(
            loss=s["loss_sum"] / count,
            loss_sft=s["sft_sum"] / max(s["sft_count"], 1.0),
            loss_mixed_sft=s["mixed_sft_sum"] / count,
            lam=lam,
            estimate_accuracy=s["est_correct"] / s["est_total"] if s["est_total"] else float("nan"),
            weight_max=weight_max,
            weight_entropy=s["weight_entropy_sum"] / max(s["num_samples"], 1.0),
            num_samples=s["num_samples"],
            num_tokens=s["num_tokens"],
            loss_sum=s["loss_sum"],
            count=s["count"],
            sft_sum=s["sft_sum"],
            sft_count=s["sft_count"],
        )

    def as_dict(self) -> dict[str, float]:
        """By metric name, as logged (``lambda`` for :attr:`lam`)."""
        out = dataclasses.asdict(self)
        out["lambda"] = out.pop("lam")
        return out
