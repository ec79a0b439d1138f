"""Fixed-length rows and their stacking into a :class:`~megatron_ift.data.batch.Batch`.

A row is a dict of numpy arrays with the fields of :class:`~megatron_ift.data.batch.Batch`
(``segment_ids`` only for packed rows, ``sample_ids`` a 0-d array); :func:`collate` stacks rows
into the batch the training step consumes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_ift.data.batch import Batch


def assemble_row(
    segments: Sequence[tuple[np.ndarray, np.ndarray]],
    seq_length: int,
    pad_id: int,
    sample_id: int,
    packed: bool,
    multiple: int = 1,
) -> dict[str, np.ndarray]:
    """One row of the contract from tokenised samples placed back to back.

    With ``multiple > 1`` every sample is followed by pad tokens up to a multiple of
    ``multiple`` (:func:`padded_length`) that belong to its segment (positions running on) and
    are never trained, nor is the sample's last token (its label is a pad): attention sees them
    only after the sample's own tokens, so the sample's losses are unchanged; Transformer
    Engine's THD context parallelism needs every segment split into ``2 x cp`` chunks.

    Args:
        segments: ``(input_ids [n_k], assistant_mask [n_k])`` per sample; lengths sum to at most
            ``seq_length``. ``assistant_mask[t] = 1`` marks tokens the model must produce.
        seq_length: row length; the tail is padding.
        pad_id: id written at padding positions and as the last label.
        sample_id: the row's stable sample index.
        packed: include ``segment_ids`` (always, for a packed dataset, even with one segment).
        multiple: pad every sample to a multiple of this many tokens (packed rows only).

    Returns:
        ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (``[s]`` each), ``segment_ids``
        when packed, and ``sample_ids`` (a 0-d array).
    """
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    target = np.zeros(seq_length, dtype=np.float32)  # 1 where the token itself is trained
    segment = np.empty(seq_length, dtype=np.int64)
    position = np.empty(seq_length, dtype=np.int64)
    t = 0
    if multiple > 1 and not packed:
        raise ValueError("assemble_row: multiple > 1 pads packed samples only")
    for k, (ids, mask) in enumerate(segments):
        n = len(ids)
        padded = padded_length(n, multiple)
        if t + padded > seq_length:
            raise ValueError(f"segments need {t + padded} tokens but the row has {seq_length}")
        tokens[t : t + n] = ids
        target[t : t + n] = mask
        segment[t : t + padded] = k  # the sample's pads (tokens stay pad_id, target 0)
        position[t : t + padded] = np.arange(padded)
        t += padded
    segment[t:] = len(segments)  # padding: a segment of its own
    # Packed padding restarts its positions like any segment; an unpacked row just runs on.
    position[t:] = np.arange(seq_length - t) if packed else np.arange(t, seq_length)
    target[t:] = 0.0

    labels = np.empty_like(tokens)
    labels[:-1] = tokens[1:]
    labels[-1] = pad_id
    # Megatron convention: position t is trained on labels[t] = tokens[t + 1], so the loss mask
    # is the next token's target flag, and never across a segment boundary (a segment's last
    # position would otherwise predict the next sample's first token).
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    loss_mask[:-1] = target[1:] * (segment[1:] == segment[:-1])
    row = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position}
    if packed:
        row["segment_ids"] = segment
    row["sample_ids"] = np.asarray(sample_id, dtype=np.int64)
    return row


def padded_length(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def empty_row(seq_length: int, pad_id: int, packed: bool) -> dict[str, np.ndarray]:
    """A filler row (all padding, nothing trained, ``sample_ids = -1``) that completes the
    last micro-batch of an evaluation pass so every data-parallel rank runs the same steps."""
    return assemble_row([], seq_length, pad_id, -1, packed)


def collate(rows: Sequence[dict[str, np.ndarray]]) -> Batch:
    """Stack rows into a batch of CPU tensors.

    Returns:
        ``tokens/labels/position_ids [b, s] int64``, ``loss_mask [b, s] float32``,
        ``segment_ids [b, s] int64`` when the rows have them, ``sample_ids [b] int64``.
    """

    def stack(key: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack([r[key] for r in rows])).to(dtype)

    return Batch(
        tokens=stack("tokens", torch.int64),
        labels=stack("labels", torch.int64),
        loss_mask=stack("loss_mask", torch.float32),
        position_ids=stack("position_ids", torch.int64),
        sample_ids=stack("sample_ids", torch.int64),
        segment_ids=stack("segment_ids", torch.int64) if "segment_ids" in rows[0] else None,
    )
