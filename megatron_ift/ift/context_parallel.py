"""Context parallelism for IFT: rows split along the sequence, the IFT math still exact.

megatron-core's load-balanced layout splits a row of ``s`` tokens into ``2 x cp`` chunks of
``c = s / (2 cp)`` and gives context-parallel rank ``r`` chunks ``r`` and ``2 cp - 1 - r`` (so every
rank gets the same share of causal-attention work). IFT couples positions across the whole
sequence, so three of its steps need the other ranks' chunks:

* the estimated sequence: position ``t`` takes the estimate made at ``t - 1`` (another chunk,
  possibly another rank);
* the propagation weights: a discounted scan along each sample, then a per-sample rescaling;
* the per-sample loss mean (``sample_mean``) and its count.

What crosses ranks is one ``[b, s]`` row of token ids (estimates) or of log-probabilities per
micro-batch, gathered over the context-parallel group (:func:`gather_sequence`; its backward
reduce-scatters, so the gradient of a gathered log-prob returns to the rank that computed it).
Every rank then holds the micro-batch's full per-token log-probs and computes the weights and the
loss on the whole sequence exactly as without context parallelism (no carries to pass, no
approximation); only context-parallel rank 0 reports that loss and its count
(:func:`first_rank_only`), so megatron-core's sums over the data-parallel x context-parallel
group count each sample once, while every rank's backward still returns its share of the
gradient. The cost is ``b x s`` floats per micro-batch against the ``b x s x h`` of the attention's
key/value exchange: negligible.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_ift.ift.groups import ProcessGroup, group_rank_world


def local_positions(seq_length: int, cp_rank: int, cp_size: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Global positions ``[s / cp]`` of context-parallel rank ``cp_rank``'s tokens (its two
    chunks ``cp_rank`` and ``2 cp - 1 - cp_rank``, in that order).

    Raises:
        ValueError: ``seq_length`` is not a multiple of ``2 x cp_size``.
    """
    if seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} is not a multiple of 2 x context parallel "
                         f"size = {2 * cp_size}")
    c = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def gathered_order(seq_length: int, cp_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``[s]``: the index into the concatenation of every rank's local tokens (rank 0's first)
    of each global position; ``gathered.index_select(dim, gathered_order(...))`` restores the
    sequence order."""
    every = torch.cat([local_positions(seq_length, r, cp_size, device) for r in range(cp_size)])
    return torch.argsort(every)


def thd_local_positions(cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int,
                        local_tokens: Optional[int] = None) -> torch.Tensor:
    """Global token indices ``[t / cp]`` of context-parallel rank ``cp_rank``'s tokens of packed
    (THD) sequences, Transformer Engine's layout: every sequence ``[cu[i], cu[i + 1])`` is split
    into ``2 x cp`` chunks and the rank holds chunks ``cp_rank`` and ``2 cp - 1 - cp_rank`` *of
    every sequence*, sequences in order (one sequence ``[0, s]`` gives :func:`local_positions`).

    Computed on ``cu_seqlens``' device without reading it back to the host when
    ``local_tokens`` is given.

    Args:
        cu_seqlens: ``[n + 1]`` int cumulative (padded) sequence lengths from 0, each length a
            multiple of ``2 x cp_size`` (:func:`check_thd_split`).
        cp_rank, cp_size: the rank and the context-parallel size.
        local_tokens: ``cu[-1] / cp_size``, the rank's token count (read from ``cu_seqlens``
            when None: a host synchronisation if it lives on a device).
    """
    cu = cu_seqlens.to(torch.int64)
    if local_tokens is None:
        local_tokens = int(cu[-1]) // cp_size
    j = torch.arange(local_tokens, device=cu.device)
    local = cu // cp_size  # where each sequence's share starts in every rank's tokens
    seq = torch.searchsorted(local[1:], j, right=True)  # the sequence of each token
    i = j - local[seq]  # index within the rank's share of that sequence
    half = (cu[seq + 1] - cu[seq]) // (2 * cp_size)  # that sequence's chunk length
    first = i < half
    chunk = torch.where(first, cp_rank, 2 * cp_size - 1 - cp_rank)
    return cu[seq] + chunk * half + torch.where(first, i, i - half)


def thd_gathered_order(cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """``[t]``: the index into the concatenation of every rank's THD tokens (rank 0's first) of
    each global token; ``gathered.index_select(dim, order)`` restores the sequence order."""
    every = torch.cat([thd_local_positions(cu_seqlens, r, cp_size) for r in range(cp_size)])
    return torch.argsort(every)


def check_thd_split(cu_seqlens: torch.Tensor, cp_size: int) -> None:
    """Raise ValueError unless every packed sequence of ``cu_seqlens`` (host tensor) can be
    split into ``2 x cp_size`` chunks (Transformer Engine's THD context parallelism)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bad = [n for n in lengths if n % (2 * cp_size)]
    if bad:
        raise ValueError(f"packed sequence lengths {bad} are not multiples of 2 x context parallel "
                         f"size = {2 * cp_size} (THD context parallelism splits every sequence); "
                         "the packer pads segments to data.segment_multiple")


class _GatherSeqFirst(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward: reduce-scatter (sum) along dim 0."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = torch.empty((grad.shape[0] // world,) + tuple(grad.shape[1:]), dtype=grad.dtype,
                          device=grad.device)
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def gather_seq_first(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``[cp * n, ...]``: every rank's ``x [n, ...]`` (rank order), differentiable: the gradient of
    each slice is summed over the ranks and returned to the rank it came from."""
    if group_rank_world(group)[1] == 1:
        return x
    return _GatherSeqFirst.apply(x, group)


def gather_sequence(x: torch.Tensor, group: ProcessGroup,
                    order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full rows ``[b, s, ...]`` from each context-parallel rank's tokens ``x [b, s / cp, ...]``,
    differentiable (see :func:`gather_seq_first`).

    Args:
        order: ``[s]`` index of each global position into the rank-order concatenation of the
            ranks' tokens, on ``x``'s device (:func:`thd_gathered_order` for packed THD rows);
            default: the load-balanced row layout (:func:`gathered_order`).
    """
    _, cp = group_rank_world(group)
    if cp == 1:
        return x
    gathered = gather_seq_first(x.transpose(0, 1), group)  # [cp * s/cp, b, ...], rank order
    if order is None:
        order = gathered_order(gathered.shape[0], cp, x.device)
    return gathered.index_select(0, order).transpose(0, 1)


def first_rank_only(value: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``value`` on context-parallel rank 0, ``0 * value`` elsewhere (still part of the graph, so
    that every rank's backward runs the collectives of :func:`gather_sequence`)."""
    rank, _ = group_rank_world(group)
    return value if rank == 0 else value * 0
