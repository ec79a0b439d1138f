"""Sequence packing: several samples per fixed-length row, and the masks that keep them apart.

A packed row holds samples back to back, then padding::

    tokens       a a a a b b b c c _ _ _
    segment_ids  0 0 0 0 1 1 1 2 2 3 3 3      (padding is its own segment)
    position_ids 0 1 2 3 0 1 2 0 1 0 1 2      (restart per segment)

Attention never crosses a segment: :func:`packed_attention_mask` for the local spec's attention
(a dense ``[b, 1, s, s]`` mask), :func:`cu_seqlens` for Transformer Engine's THD kernels (the
step's ``PackedSeqParams``, :mod:`megatron_ift.training.microbatch`). The loss mask is 0 at each segment's last position, whose
label would be the next segment's first token (see :mod:`megatron_ift.data.batch`).
"""

from __future__ import annotations

import bisect
import math
from typing import Optional, Sequence

import numpy as np
import torch


def pack_best_fit(lengths: Sequence[int], capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bin packing of samples into rows of ``capacity`` tokens.

    Longest samples first, each into the fullest row it still fits (ties: the earliest row),
    which typically fills rows to well over 95 %. Deterministic: it depends only on the lengths.

    Args:
        lengths: ``[n]`` sample lengths, each in ``[1, capacity]``.
        capacity: tokens per row (``seq_length``).

    Returns:
        ``(offsets [num_rows + 1], items [n])`` in CSR form: row ``r`` holds samples
        ``items[offsets[r]:offsets[r + 1]]``, in ascending sample order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(
            f"sample lengths must be in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]"
        )
    order = np.lexsort((np.arange(lengths.size), -lengths))  # length desc, index asc
    free: list[tuple[int, int]] = []  # sorted (space left, row id)
    rows: list[list[int]] = []
    for i in order.tolist():
        need = int(lengths[i])
        pos = bisect.bisect_left(free, (need, -1))
        if pos == len(free):
            rows.append([i])
            space, row = capacity - need, len(rows) - 1
        else:
            space, row = free.pop(pos)
            rows[row].append(i)
            space -= need
        if space > 0:
            bisect.insort(free, (space, row))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    items = np.fromiter((i for r in rows for i in sorted(r)), dtype=np.int64, count=lengths.size)
    return offsets, items


def packing_efficiency(num_tokens: int, num_rows: int, seq_length: int) -> float:
    """Fraction of the rows' token slots that hold real (non-pad) tokens."""
    return num_tokens / (num_rows * seq_length) if num_rows else 0.0


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask for packed rows in megatron-core's convention (True = masked out).

    A query attends to a key iff the key is not later (causal) and in the same segment.
    megatron-core's local ``DotProductAttention`` uses a given mask *instead of* its own causal
    one, so causality is part of this mask.

    Args:
        segment_ids: ``[b, s]`` int segment ids (contiguous runs per row).

    Returns:
        ``[b, 1, s, s]`` bool, True where attention is not allowed.
    """
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()  # [s, s]
    return ~(same & causal).unsqueeze(1)  # [b, 1, s, s]


def causal_attention_mask(batch_size: int, seq_length: int) -> torch.Tensor:
    """The plain causal mask ``[b, 1, s, s]`` (True = masked), for rows that are not packed."""
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    return (~causal).expand(batch_size, 1, seq_length, seq_length).contiguous()


def attention_mask(segment_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask a micro-batch needs with the local attention.

    Args:
        segment_ids: the batch's ``segment_ids [b, s]`` (None for rows that are not packed).

    Returns:
        ``[b, 1, s, s]`` bool (True = masked) for packed rows; None otherwise, which leaves
        megatron-core's own causal mask in place (unpacked rows only pad at the end, and
        causal attention never looks ahead into the padding).
    """
    return None if segment_ids is None else packed_attention_mask(segment_ids)


def cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence lengths of the segments of ``segment_ids [b, s]``, rows flattened.

    Every row starts a new sequence, and so does every change of segment id within a row, so
    padding (its own segment) is a sequence of its own and the lengths cover all ``b * s`` tokens.

    Returns:
        ``[num_segments + 1]`` int32, starting at 0 and ending at ``b * s``.
    """
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).squeeze(1)  # [num_segments]
    end = torch.tensor([b * s], device=segment_ids.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def thd_segment_multiple(requested: int, context_parallel_size: int, thd: bool) -> int:
    """The multiple every packed segment is padded to (``data.segment_multiple`` as the data is
    built): Transformer Engine's THD context parallelism (``thd``: packed rows on the TE spec)
    splits every segment into ``2 x cp`` chunks, so the least common multiple of ``requested``
    and ``2 x cp`` then; ``requested`` otherwise."""
    if thd and context_parallel_size > 1:
        return math.lcm(requested, 2 * context_parallel_size)
    return requested
