"""The micro-batch contract between the data pipeline and the training step.

Every data path (SFT packed or not, pretraining) yields :class:`Batch` values of fixed-length
rows in the Megatron convention: position ``t`` is trained on ``labels[t] = tokens[t + 1]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Batch:
    """One micro-batch of ``b`` rows of ``s`` tokens (host tensors from the loader)."""

    tokens: torch.Tensor
    """``[b, s]`` int64 input ids."""
    labels: torch.Tensor
    """``[b, s]`` int64: ``tokens`` shifted left; the last position holds the pad id (SFT) or
    the next token (pretraining)."""
    loss_mask: torch.Tensor
    """``[b, s]`` float32: 1 where ``labels[t]`` is trained."""
    position_ids: torch.Tensor
    """``[b, s]`` int64: per segment when packed, else ``0..s-1``."""
    sample_ids: torch.Tensor
    """``[b]`` int64: stable global sample index (keys IFT's sampling noise); -1 for empty
    filler rows."""
    segment_ids: Optional[torch.Tensor] = None
    """``[b, s]`` int64, packed rows only: which sample each position belongs to (padding is a
    segment of its own)."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(b, s)``."""
        return tuple(self.tokens.shape)

    def to(self, device: torch.device) -> "Batch":
        """This batch with every tensor on ``device`` (asynchronous from pinned host memory)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so the copy to a GPU can overlap compute."""
        return self._map(lambda t: t.pin_memory())

    def rows(self, start: int, stop: int) -> "Batch":
        """Rows ``start:stop`` (views)."""
        return self._map(lambda t: t[start:stop])

    def columns(self, positions: torch.Tensor) -> "Batch":
        """The tokens at ``positions [k]`` of every row (``sample_ids`` kept): a context-parallel
        rank's share."""
        return self._map(lambda t: t[:, positions] if t.dim() == 2 else t)

    def without_loss(self) -> "Batch":
        """The same rows with nothing trained (a filler micro-batch)."""
        return dataclasses.replace(self, loss_mask=torch.zeros_like(self.loss_mask))

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                        for f in dataclasses.fields(Batch)})
