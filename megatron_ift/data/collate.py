"""The micro-batch contract: fixed-length rows and their stacking into CPU tensors.

Every data path (SFT packed or not, pretraining) yields dicts with these keys, which the
training step consumes::

    tokens       [b, s] int64    input ids
    labels       [b, s] int64    tokens shifted left (labels[t] = tokens[t + 1]); the last
                                 position holds the pad id (SFT) or the next token (pretrain)
    loss_mask    [b, s] float32  1 where labels[t] is trained
    position_ids [b, s] int64    per segment when packed, else 0..s-1
    segment_ids  [b, s] int64    packed rows only (absent otherwise); padding has its own id
    sample_ids   [b]    int64    stable global sample index (keys IFT's sampling noise); -1 for
                                 empty filler rows
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")


def assemble_row(
    segments: Sequence[tuple[np.ndarray, np.ndarray]],
    seq_length: int,
    pad_id: int,
    sample_id: int,
    packed: bool,
) -> dict[str, np.ndarray]:
    """One row of the contract from tokenised samples placed back to back.

    Args:
        segments: ``(input_ids [n_k], assistant_mask [n_k])`` per sample; lengths sum to at most
            ``seq_length``. ``assistant_mask[t] = 1`` marks tokens the model must produce.
        seq_length: row length; the tail is padding.
        pad_id: id written at padding positions and as the last label.
        sample_id: the row's stable sample index.
        packed: include ``segment_ids`` (always, for a packed dataset, even with one segment).

    Returns:
        ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (``[s]`` each), ``segment_ids``
        when packed, and ``sample_ids`` (a 0-d array).
    """
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    target = np.zeros(seq_length, dtype=np.float32)  # 1 where the token itself is trained
    segment = np.empty(seq_length, dtype=np.int64)
    position = np.empty(seq_length, dtype=np.int64)
    t = 0
    for k, (ids, mask) in enumerate(segments):
        n = len(ids)
        if t + n > seq_length:
            raise ValueError(f"segments need {t + n} tokens but the row has {seq_length}")
        tokens[t : t + n] = ids
        target[t : t + n] = mask
        segment[t : t + n] = k
        position[t : t + n] = np.arange(n)
        t += n
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


def empty_row(seq_length: int, pad_id: int, packed: bool) -> dict[str, np.ndarray]:
    """A filler row (all padding, nothing trained, ``sample_ids = -1``) that completes the
    last micro-batch of an evaluation pass so every data-parallel rank runs the same steps."""
    return assemble_row([], seq_length, pad_id, -1, packed)


def collate(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into the micro-batch dict of CPU tensors (see the module docstring).

    Returns:
        ``tokens/labels/position_ids [b, s] int64``, ``loss_mask [b, s] float32``,
        ``segment_ids [b, s] int64`` when the rows have them, ``sample_ids [b] int64``.
    """
    batch = {}
    for key in KEYS:
        if key in rows[0]:
            batch[key] = torch.from_numpy(np.stack([r[key] for r in rows]))  # [b, s]
    batch["sample_ids"] = torch.from_numpy(
        np.stack([r["sample_ids"] for r in rows]).astype(np.int64)
    )  # [b]
    batch["loss_mask"] = batch["loss_mask"].to(torch.float32)
    for key in ("tokens", "labels", "position_ids", "segment_ids"):
        if key in batch:
            batch[key] = batch[key].to(torch.int64)
    return batch
