"""A micro-batch made ready for the step: data-dependent metadata from the host, tensors on the device.

Some per-micro-batch facts have data-dependent sizes: which positions are trained (the answer
rows the output layer runs on), how many samples/segments a packed row holds, the packed
sequences' ``cu_seqlens``. On a GPU, deriving them from device tensors (``nonzero``, ``unique``,
``int(t.max())``) stalls the stream once per micro-batch. The loader's host batch already has
them, so they are computed there, before the copy, and travel with the batch: the micro-batch
loops never wait for the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_ift.data.batch import Batch
from megatron_ift.data.packing import attention_mask, cu_seqlens
from megatron_ift.ift import Groups


@dataclass(frozen=True)
class PositionSelection:
    """Selected ``(row, col)`` entries of a ``[b, s]`` micro-batch, in row-major order."""

    rows: torch.Tensor
    """``[n]`` long row indices."""
    cols: torch.Tensor
    """``[n]`` long column (sequence) indices."""
    shape: tuple[int, int]
    """``(b, s)`` of the micro-batch."""
    empty: bool
    """Nothing was selected; one dummy entry ``(0, 0)`` stands in, so every rank still runs
    the same collectives."""

    @staticmethod
    def from_mask(mask: torch.Tensor) -> "PositionSelection":
        """The entries where ``mask [b, s]`` is non-zero."""
        rows, cols = mask.bool().nonzero(as_tuple=True)
        empty = rows.numel() == 0
        if empty:
            rows = torch.zeros(1, dtype=torch.long, device=mask.device)
            cols = torch.zeros(1, dtype=torch.long, device=mask.device)
        return PositionSelection(rows=rows, cols=cols, shape=tuple(mask.shape), empty=empty)

    def seq_first_index(self) -> torch.Tensor:
        """Flat indices of the entries in a ``[s, b]`` (Megatron sequence-first) layout."""
        return self.cols * self.shape[0] + self.rows

    def scatter_grad(self, values: torch.Tensor) -> torch.Tensor:
        """``values [n]`` placed in a zero ``[b, s]`` tensor, differentiably.

        An empty selection (an all-prompt micro-batch) still returns a result connected to
        ``values``' graph (with zero gradient), so the schedule's backward has a graph to run.
        """
        out = values.new_zeros(self.shape)
        if self.empty:
            return out + values.sum() * 0.0
        return out.index_put((self.rows, self.cols), values)

    def scatter(self, values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """``fill [b, s]`` with ``values [n]`` written at the selected entries (copy)."""
        out = fill.clone()
        if not self.empty:
            out[self.rows, self.cols] = values.to(out.dtype)
        return out

    def to(self, device: torch.device) -> "PositionSelection":
        return dataclasses.replace(self, rows=self.rows.to(device, non_blocking=True),
                                   cols=self.cols.to(device, non_blocking=True))


@dataclass(frozen=True, kw_only=True)
class MicroBatch(Batch):
    """A :class:`~megatron_ift.data.batch.Batch` on the compute device with what the step needs
    to know about it, computed on the host (:meth:`prepare`)."""

    index: int
    """Position of the micro-batch in the step (estimates are matched to it by this)."""
    groups: Groups
    """Which sample or packed segment each position belongs to."""
    selection: PositionSelection
    """The trained positions (``loss_mask`` non-zero): the rows the output layer runs on."""
    output_positions: torch.Tensor
    """``selection`` as ``[n]`` flat indices into the sequence-first ``[s, b]`` layout."""
    packed_seq_params: Optional[PackedSeqParams] = None
    """Packed rows as Transformer Engine THD sequences (the TE spec); None otherwise."""

    @staticmethod
    def prepare(batch: Batch, index: int, device: torch.device, *, thd: bool) -> "MicroBatch":
        """Host batch -> micro-batch on ``device``.

        Args:
            batch: host tensors from the loader.
            index: position in the step.
            device: the compute device.
            thd: packed rows go to attention as THD sequences (``packed_seq_params``) instead of
                a dense ``[b, 1, s, s]`` mask.
        """
        groups = Groups.build(batch.loss_mask, batch.segment_ids)
        selection = PositionSelection.from_mask(batch.loss_mask)
        psp = None
        if thd and batch.segment_ids is not None:
            cu = cu_seqlens(batch.segment_ids)
            longest = int((cu[1:] - cu[:-1]).max())
            cu = cu.to(device, non_blocking=True)
            psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                  max_seqlen_q=longest, max_seqlen_kv=longest)
        on_device = batch.to(device)
        selection = selection.to(device)
        return MicroBatch(
            **{f.name: getattr(on_device, f.name) for f in dataclasses.fields(Batch)},
            index=index,
            groups=dataclasses.replace(groups, index=groups.index.to(device, non_blocking=True),
                                       segment=groups.segment.to(device, non_blocking=True)),
            selection=selection,
            output_positions=selection.seq_first_index(),
            packed_seq_params=psp,
        )

    def attention_mask(self) -> Optional[torch.Tensor]:
        """The dense mask of packed rows on the local spec (True = masked), built when a forward
        needs it (it is ``[b, 1, s, s]``: not kept for every micro-batch of the step); None for
        THD rows and for rows that are not packed (causal)."""
        if self.packed_seq_params is not None:
            return None
        return attention_mask(self.segment_ids)
