"""Propagation weights (the temporal residual connection), per sample or per packed segment.

All tensors are batch-first ``[b, s]``. ``segment_index`` numbers the samples packed in a row
(0, 0, 1, 1, 1, 2, ...; non-decreasing); without packing a row is one sample. Discounted sums
never cross a segment boundary, and the rescaling to ``sum_t w = n`` is per segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ift.ift.config import IFTConfig

_CHUNK = 128
_RIGHT_MASKED_VALUE = 1e6


@dataclass(frozen=True)
class Groups:
    """Which sample (row, or packed segment) each position belongs to."""

    index: torch.Tensor  # [b, s] long: the group of each position, 0..num-1
    segment: torch.Tensor  # [b, s] long: segment number within the row (0 without packing)
    num: int

    @staticmethod
    def build(loss_mask: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> "Groups":
        """Groups from optional per-position segment ids ``[b, s]`` (contiguous runs)."""
        b, s = loss_mask.shape
        dev = loss_mask.device
        if segment_ids is None:
            segment = torch.zeros(b, s, dtype=torch.long, device=dev)
            index = torch.arange(b, device=dev)[:, None].expand(b, s).contiguous()
            return Groups(index=index, segment=segment, num=b)
        if segment_ids.shape != loss_mask.shape:
            raise ValueError(
                f"segment_ids shape {tuple(segment_ids.shape)} != loss_mask {tuple(loss_mask.shape)}"
            )
        seg = segment_ids.to(dev, torch.long)
        starts = torch.ones(b, s, dtype=torch.long, device=dev)
        starts[:, 1:] = (seg[:, 1:] != seg[:, :-1]).long()
        starts[:, 0] = 0
        segment = starts.cumsum(dim=1)
        key = torch.arange(b, device=dev)[:, None] * (s + 1) + segment
        _, index = torch.unique(key, return_inverse=True)
        return Groups(index=index, segment=segment, num=int(index.max()) + 1 if index.numel() else 0)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group sums ``[num]`` of ``x [b, s]`` (differentiable)."""
        out = torch.zeros(self.num, dtype=x.dtype, device=x.device)
        return out.index_add(0, self.index.reshape(-1), x.reshape(-1))

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group maxima ``[num]`` of ``x [b, s]`` (not differentiable)."""
        out = torch.full((self.num,), -torch.inf, dtype=x.dtype, device=x.device)
        return out.scatter_reduce(0, self.index.reshape(-1), x.detach().reshape(-1), "amax")

    def segment_starts(self) -> torch.Tensor:
        """``[b, s]`` bool: the first position of every sample/segment."""
        starts = torch.ones_like(self.segment, dtype=torch.bool)
        starts[:, 1:] = self.segment[:, 1:] != self.segment[:, :-1]
        return starts


def discounted_suffix_sum(a: torch.Tensor, gamma: float, segment: torch.Tensor) -> torch.Tensor:
    """``c[t] = sum_{k >= t, same segment} gamma**(k - t) * a[k]`` for ``a [b, s]``.

    Blocked scan: a ``[L, L]`` discount matrix inside each chunk of ``L`` positions and a carry
    between chunks, so memory is ``O(b * s * L)`` and it is exact for any ``gamma`` in [0, 1].
    """
    b, s = a.shape
    dev, dt = a.device, a.dtype
    chunks = []
    carry = None  # c at the first position of the following chunk: [b]
    carry_seg = None
    for t0 in range(((s - 1) // _CHUNK) * _CHUNK, -1, -_CHUNK):
        t1 = min(t0 + _CHUNK, s)
        L = t1 - t0
        idx = torch.arange(L, device=dev)
        dist_ = (idx[None, :] - idx[:, None]).to(dt)  # [L, L]: k - t
        upper = dist_ >= 0
        pw = torch.where(upper, torch.pow(torch.tensor(gamma, dtype=dt, device=dev), dist_.clamp(min=0)), torch.zeros((), dtype=dt, device=dev))
        seg = segment[:, t0:t1]
        same = seg[:, :, None] == seg[:, None, :]  # [b, L, L]
        mat = pw[None] * same.to(dt)
        c = torch.einsum("btk,bk->bt", mat, a[:, t0:t1])
        if carry is not None:
            decay = torch.pow(torch.tensor(gamma, dtype=dt, device=dev), (L - idx).to(dt))  # [L]
            linked = (seg == carry_seg[:, None]).to(dt)
            c = c + decay[None, :] * linked * carry[:, None]
        chunks.append(c)
        carry, carry_seg = c[:, 0], seg[:, 0]
    return torch.cat(chunks[::-1], dim=1)


def propagation_weights(
    logps: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: IFTConfig,
    groups: Groups,
) -> torch.Tensor:
    """Weights ``w [b, s]``: zero where masked, summing to ``n`` within every sample/segment.

    Args:
        logps: log-probabilities of the labels ``[b, s]`` (gradients flow through the weights
            unless ``cfg.detach_weights``).
        loss_mask: ``[b, s]``, 1 on trained (answer) positions.
        cfg: the IFT options (gamma, propagation type / norm / side).
        groups: sample/segment structure from :meth:`Groups.build`.
    """
    mask = loss_mask.to(logps.dtype)
    if cfg.gamma == 0.0:
        return mask
    p = logps.detach() if cfg.detach_weights else logps
    n = groups.sum(mask)  # [G]
    n_pos = n[groups.index]  # [b, s]
    if cfg.propagation_type == "loss":
        item = -p / torch.where(n_pos > 0, n_pos, torch.ones_like(n_pos))
    elif cfg.propagation_type == "logps":
        item = -p
    else:
        item = torch.ones_like(p)
    item = item * mask

    if cfg.propagation_side == "left":
        c = discounted_suffix_sum(item, cfg.gamma, groups.segment)
        base = c
    else:
        c = discounted_suffix_sum(item.flip(1), cfg.gamma, groups.segment.flip(1)).flip(1)
        # Reference quirk: masked positions get 1e6, then the micro-batch's smallest non-zero
        # entry is added everywhere.
        c = torch.where(mask > 0, c, torch.full_like(c, _RIGHT_MASKED_VALUE))
        c = c + c[c != 0].min()
        base = 1.0 / c

    if cfg.propagation_norm == "L1":
        w = base
    elif cfg.propagation_norm == "L2":
        w = base * base
    elif cfg.propagation_norm == "log":
        w = torch.log(c + 1.0) if cfg.propagation_side == "left" else 1.0 / torch.log(c + 1.0)
    else:  # softmax over each sample's positions (shift-invariant; the shift is detached)
        shift = groups.amax(torch.where(mask > 0, base, torch.full_like(base, -torch.inf)))
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        # Masked positions are excluded before exp: their sums may be larger and overflow.
        w = torch.exp(torch.where(mask > 0, base - shift[groups.index], -torch.inf))

    w = w * mask
    total = groups.sum(w)[groups.index]
    ok = total > 0
    scaled = w * n_pos / torch.where(ok, total, torch.ones_like(total))
    # A sample whose weights all vanish (e.g. every log-prob exactly 0) falls back to uniform.
    return torch.where(ok, scaled, mask)
