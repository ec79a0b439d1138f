"""A micro-batch made ready for the step: data-dependent metadata on the host, tensors on the device.

Some per-micro-batch facts have data-dependent sizes: which positions are trained (the answer
rows the output layer runs on), how many samples/segments a packed row holds, the packed
sequences' ``cu_seqlens``. On a GPU, deriving them from device tensors (``nonzero``, ``unique``,
``int(t.max())``) stalls the stream once per micro-batch. The loader already has them on the host,
so they are computed there, before the copy, and travel with the batch: the micro-batch loop then
never waits for the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch

from megatron_ift.data.packing import packed_seq_params
from megatron_ift.device import to_device
from megatron_ift.ift import Groups
from megatron_ift.training.output_selection import PositionSelection

MicroBatch = dict[str, Any]


def prepare_microbatches(
    microbatches: Sequence[MicroBatch], device: torch.device, *, thd: bool
) -> list[MicroBatch]:
    """Host micro-batches (see :mod:`megatron_ift.data.collate`) -> micro-batches on ``device``.

    Args:
        microbatches: the step's micro-batches, host tensors.
        device: the compute device.
        thd: packed rows go to attention as Transformer Engine's THD sequences
            (``packed_seq_params``) instead of a dense ``[b, 1, s, s]`` mask.

    Returns:
        One dict per micro-batch: its tensors on ``device``, plus ``index`` (position in the step),
        ``groups`` (:class:`~megatron_ift.ift.Groups`), ``selection`` (the trained positions,
        :class:`~megatron_ift.training.output_selection.PositionSelection`) and
        ``packed_seq_params`` (None unless ``thd`` and the rows are packed).
    """
    out = []
    for i, mb in enumerate(microbatches):
        groups = Groups.build(mb["loss_mask"], mb.get("segment_ids"))
        selection = PositionSelection.from_mask(mb["loss_mask"])
        psp = packed_seq_params(mb["segment_ids"]) if thd and "segment_ids" in mb else None
        ready = to_device(mb, device)
        ready.update(
            index=i,
            groups=dataclasses.replace(
                groups, index=_move(groups.index, device), segment=_move(groups.segment, device)
            ),
            selection=dataclasses.replace(
                selection, rows=_move(selection.rows, device), cols=_move(selection.cols, device)
            ),
            packed_seq_params=_move_packed(psp, device),
        )
        out.append(ready)
    return out


def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def _move_packed(psp: Optional[Any], device: torch.device) -> Optional[Any]:
    if psp is None:
        return None
    return dataclasses.replace(
        psp, cu_seqlens_q=_move(psp.cu_seqlens_q, device), cu_seqlens_kv=_move(psp.cu_seqlens_kv, device)
    )
