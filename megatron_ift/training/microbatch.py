"""A micro-batch made ready for the step: data-dependent metadata from the host, tensors on the device.

Some per-micro-batch facts have data-dependent sizes: which positions are trained (the answer
rows the output layer runs on), how many samples/segments a packed row holds, the packed
sequences' ``cu_seqlens``. On a GPU, deriving them from device tensors (``nonzero``, ``unique``,
``int(t.max())``) stalls the stream once per micro-batch. The loader's host batch already has
them, so they are computed there, before the copy, and travel with the batch: the micro-batch
loops never wait for the device.

With context parallelism a rank keeps its two chunks of every row (megatron-core's load-balanced
layout, :func:`megatron_ift.ift.context_parallel.local_positions`) as the micro-batch's tensors,
and the whole rows (``whole``) for what IFT computes along the full sequence: the estimated
sequence, the propagation weights and the loss (:mod:`megatron_ift.ift.context_parallel`).
Packed rows on the Transformer Engine spec (THD) are split as TE splits them instead: two chunks
*of every packed segment* (:func:`megatron_ift.ift.context_parallel.thd_local_positions`, segments
padded to a multiple of ``2 x cp`` by the packer), with the whole row's ``cu_seqlens``.
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
from megatron_ift.ift.context_parallel import (
    check_thd_split,
    local_positions,
    thd_gathered_order,
    thd_local_positions,
)


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
    """A :class:`~megatron_ift.data.batch.Batch` on the compute device (this context-parallel
    rank's share of its rows) with what the step needs to know about it, computed on the host
    (:meth:`prepare`)."""

    index: int
    """Position of the micro-batch in the step (estimates are matched to it by this)."""
    groups: Groups
    """Which sample or packed segment each position of the whole rows belongs to."""
    selection: PositionSelection
    """The trained positions (``loss_mask`` non-zero) of this rank's tokens: the rows the
    output layer runs on."""
    output_positions: torch.Tensor
    """``selection`` as ``[n]`` flat indices into the sequence-first ``[s/cp, b]`` layout."""
    positions: torch.Tensor
    """``[s/cp]``: the position in the whole row of each of this rank's tokens (``arange(s)``
    without context parallelism)."""
    whole: Optional[Batch] = None
    """The whole rows, on the device, with context parallelism (None without: the micro-batch
    itself is whole; see :attr:`rows`)."""
    packed_seq_params: Optional[PackedSeqParams] = None
    """Packed rows as Transformer Engine THD sequences (the TE spec); None otherwise. Under
    context parallelism its ``cu_seqlens`` (and ``cu_seqlens_*_padded``, the same: a segment's
    pads are tokens of its sequence) describe the whole row, as TE's THD context parallelism
    takes them."""
    gather_order: Optional[torch.Tensor] = None
    """``[s]``, THD rows under context parallelism: the ``order`` of
    :func:`~megatron_ift.ift.context_parallel.gather_sequence` (every segment split over the
    ranks); None: the load-balanced row layout."""

    @staticmethod
    def prepare(batch: Batch, index: int, device: torch.device, *, thd: bool,
                cp_rank: int = 0, cp_size: int = 1) -> "MicroBatch":
        """Host batch -> micro-batch on ``device``.

        Args:
            batch: host tensors from the loader (whole rows).
            index: position in the step.
            device: the compute device.
            thd: packed rows go to attention as THD sequences (``packed_seq_params``) instead of
                a dense ``[b, 1, s, s]`` mask.
            cp_rank, cp_size: this rank in the context-parallel group; it keeps its two chunks of
                every row (THD: of every packed segment).

        Raises:
            ValueError: THD rows under context parallelism with more than one row per
                micro-batch, or a segment whose length is not a multiple of ``2 x cp_size``.
        """
        groups = Groups.build(batch.loss_mask, batch.segment_ids)
        thd = thd and batch.segment_ids is not None
        cu = cu_seqlens(batch.segment_ids) if thd else None  # host, whole rows
        order = None
        if cp_size == 1:
            positions = torch.arange(batch.shape[1])
        elif thd:
            if batch.shape[0] != 1:
                raise ValueError(f"THD rows with context parallelism need one row per micro-batch "
                                 f"(got {batch.shape[0]})")
            check_thd_split(cu, cp_size)
            positions = thd_local_positions(cu, cp_rank, cp_size)
            order = thd_gathered_order(cu, cp_size).to(device, non_blocking=True)
        else:
            positions = local_positions(batch.shape[1], cp_rank, cp_size)
        whole = None
        if cp_size > 1:
            whole = batch.to(device)
            batch = batch.columns(positions)
        selection = PositionSelection.from_mask(batch.loss_mask)
        psp = None
        if thd:
            longest = int((cu[1:] - cu[:-1]).max())
            cu = cu.to(device, non_blocking=True)
            # Under CP, cu_seqlens_*_padded: the same offsets (a segment's pads are tokens of its
            # sequence), by which megatron-core's rotary embedding and TE split the ranks' shares.
            padded = cu if cp_size > 1 else None
            psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                  cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
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
            positions=positions.to(device, non_blocking=True),
            whole=whole,
            packed_seq_params=psp,
            gather_order=order,
        )

    @property
    def rows(self) -> Batch:
        """The whole rows (with context parallelism: every rank's chunks)."""
        return self.whole if self.whole is not None else self

    def attention_mask(self) -> Optional[torch.Tensor]:
        """The dense mask of packed rows on the local spec (True = masked), built when a forward
        needs it (it is ``[b, 1, s/cp, s]``: not kept for every micro-batch of the step); None
        for THD rows and for rows that are not packed (causal; under context parallelism the
        attention derives it from the layout)."""
        if self.packed_seq_params is not None or self.segment_ids is None:
            return None
        if self.whole is None:
            return attention_mask(self.segment_ids)
        seg = self.whole.segment_ids  # [b, s]: keys in sequence order, queries this rank's tokens
        keys = torch.arange(seg.shape[1], device=seg.device)
        allowed = (seg[:, self.positions, None] == seg[:, None, :]) & (keys[None, :] <= self.positions[:, None])
        return ~allowed.unsqueeze(1)  # [b, 1, s/cp, s]
