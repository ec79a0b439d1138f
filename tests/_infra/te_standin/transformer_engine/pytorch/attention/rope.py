"""``apply_rotary_pos_emb`` (TE's fused RoPE), in plain PyTorch.

``t``: ``sbhd`` ``[s, b, h, d]``, ``bshd`` ``[b, s, h, d]`` or ``thd`` ``[t, h, d]`` with
``cu_seqlens`` (positions restart at every sequence); ``freqs`` ``[s_max, 1, 1, d_rot]`` (fp32).
The first ``d_rot`` channels rotate (``interleaved``: pairs ``(2i, 2i+1)``, else halves), the rest
pass through. ``thd`` with context parallelism (``cp_size > 1``), as TE's fused kernel: ``t`` holds
rank ``cp_rank``'s tokens, ``cu_seqlens`` the whole (padded) sequences; each sequence's share on
the rank is its chunks ``cp_rank`` and ``2 cp - 1 - cp_rank`` of ``2 cp``, so a token's position
is its position in the whole sequence. No host synchronisation: positions within the packed
sequences are computed on the device.
"""

from __future__ import annotations

from typing import Optional

import torch


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool) -> torch.Tensor:
    rot = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    out = t_rot * cos + _rotate_half(t_rot, interleaved) * sin
    return torch.cat((out, t_pass), dim=-1) if t_pass.shape[-1] else out


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, tensor_format: str = "sbhd",
                         interleaved: bool = False, fused: bool = False,
                         cu_seqlens: Optional[torch.Tensor] = None, cp_size: int = 1,
                         cp_rank: int = 0, start_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    if start_positions is not None:
        raise NotImplementedError("the Transformer Engine stand-in's RoPE has no start_positions")
    if tensor_format == "sbhd":
        return _apply(t, freqs[: t.shape[0]], interleaved)
    if tensor_format == "bshd":
        return _apply(t, freqs[: t.shape[1]].transpose(0, 1), interleaved)
    if tensor_format != "thd":
        raise ValueError(f"tensor_format={tensor_format!r}: sbhd, bshd or thd")
    if cu_seqlens is None:
        raise ValueError("tensor_format='thd' needs cu_seqlens")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError("cu_seqlens must be int32 (as TE's kernels take it)")
    # Each token's position in its sequence, on the device (TE's kernel reads cu_seqlens there).
    pos = thd_positions(cu_seqlens, t.shape[0], cp_size, cp_rank)[1]
    return _apply(t, freqs.index_select(0, pos)[:, 0], interleaved)


def thd_positions(cu_seqlens: torch.Tensor, tokens: int, cp_size: int = 1,
                  cp_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence, position in it)`` ``[tokens]`` each of rank ``cp_rank``'s THD tokens, TE's
    context-parallel split of every sequence of ``cu_seqlens`` (whole sequences) into ``2 cp``
    chunks (rank ``r``: chunks ``r`` and ``2 cp - 1 - r``); on the device, no host sync."""
    cu = cu_seqlens.to(torch.int64)
    j = torch.arange(tokens, device=cu.device)
    local = cu // cp_size
    seq = torch.searchsorted(local[1:], j, right=True)
    i = j - local[seq]
    if cp_size == 1:
        return seq, i
    half = (cu[seq + 1] - cu[seq]) // (2 * cp_size)
    first = i < half
    chunk = torch.where(first, cp_rank, 2 * cp_size - 1 - cp_rank)
    return seq, chunk * half + torch.where(first, i, i - half)
