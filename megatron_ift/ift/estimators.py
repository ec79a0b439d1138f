"""Vocab-parallel token estimators (IFT step 1): only token ids leave these functions.

Inputs are the local logits shard ``[b, s, v/tp]`` (rank r holds global ids
``[r * v/tp, (r + 1) * v/tp)``, megatron-core's vocab split). Columns at or beyond ``vocab_size``
are Megatron's vocabulary padding and are never chosen. Results are identical for every
tensor-parallel degree:

* ``greedy``: argmax, ties to the lowest global id (two [b, s] all-reduces: MAX then MIN).
* ``kth``: the k-th entry of the order (logit desc, id asc): k rounds of greedy, each excluding
  the previous winner.
* ``sample``: Gumbel-max over ``z / T + g``; the noise ``g`` is a counter-based hash of (seed,
  step, sample id, position, *global* vocab id), so no rank needs another's noise.
* ``top_p``: nucleus sampling. Nucleus membership is decided on fixed-point integer
  probabilities (``round(exp(z/T - max) * 2**40)``) whose sums are exact, so the nucleus does not
  depend on the reduction order; a binary search over the integer threshold then keeps the
  smallest set of top tokens whose mass reaches ``p`` (ties at the threshold all kept), and
  Gumbel-max samples inside it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_ift.ift.groups import ProcessGroup, all_reduce_, group_rank_world
from megatron_ift.ift.config import IFTConfig

_NO_ID = torch.iinfo(torch.int64).max
_FIXED_POINT_BITS = 40
_MASK32 = 0xFFFFFFFF
_SAMPLE_CHUNK = 1024  # positions per sampling chunk (bounds the noise buffers)


def _valid_view(logits: torch.Tensor, vocab_size: int, group: ProcessGroup):
    """The local columns that are real vocabulary entries, and the shard's first global id."""
    rank, _ = group_rank_world(group)
    part = logits.shape[-1]
    vocab_start = rank * part
    n_valid = max(0, min(part, vocab_size - vocab_start))
    return logits[..., :n_valid], vocab_start


def _argmax_global(scores: torch.Tensor, vocab_start: int, group: ProcessGroup) -> torch.Tensor:
    """Global argmax over vocab-sharded ``scores [..., v_local]``, ties to the lowest global id."""
    lead = scores.shape[:-1]
    if scores.shape[-1] == 0:
        best = torch.full(lead, -math.inf, dtype=torch.float64, device=scores.device)
        local_ids = torch.full(lead, _NO_ID, dtype=torch.int64, device=scores.device)
    else:
        # One pass for value and index (the first maximum on ties). float64 holds every
        # float32/bf16 value exactly, so MAX and equality stay exact.
        best, local_ids = scores.max(dim=-1)
        best = best.to(torch.float64)
        local_ids = local_ids + vocab_start
    global_best = all_reduce_(best.clone(), dist.ReduceOp.MAX, group)
    cand = torch.where(best == global_best, local_ids, torch.full_like(local_ids, _NO_ID))
    ids = all_reduce_(cand, dist.ReduceOp.MIN, group)
    # A row with a NaN (a diverged model) has no maximum (NaN != NaN): give it id 0 so the
    # estimate stays a valid embedding index; the optimisation pass then sees the non-finite
    # logits itself and the trainer's non-finite policy acts instead of an IndexError.
    return torch.where(ids == _NO_ID, torch.zeros_like(ids), ids)


def greedy(logits: torch.Tensor, vocab_size: int, group: ProcessGroup = None) -> torch.Tensor:
    """Argmax token ids ``[b, s]`` of vocab-parallel ``logits [b, s, v/tp]``."""
    valid, start = _valid_view(logits, vocab_size, group)
    return _argmax_global(valid, start, group)


def kth(logits: torch.Tensor, k: int, vocab_size: int, group: ProcessGroup = None) -> torch.Tensor:
    """The k-th most likely token (order: logit descending, id ascending); ``k <= vocab_size``
    (:meth:`IFTConfig.check_vocab`)."""
    valid, start = _valid_view(logits, vocab_size, group)
    work = valid.detach().clone()
    for _ in range(k - 1):
        ids = _argmax_global(work, start, group)
        local = ids - start
        here = (local >= 0) & (local < work.shape[-1])
        # Exclude this round's winner on the rank that owns it (other ranks write back what
        # they had: no branch on the data, so no host sync on a GPU).
        idx = local.clamp(0, work.shape[-1] - 1).unsqueeze(-1)
        cur = work.gather(-1, idx)
        work.scatter_(-1, idx, torch.where(here.unsqueeze(-1), -math.inf, cur))
    return _argmax_global(work, start, group)


# --- counter-based noise -------------------------------------------------------------------

def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * m + (((hi * m) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32): well-distributed, exact on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(
    seed: int,
    step: int,
    sample_ids: torch.Tensor,
    positions: torch.Tensor,
    vocab_ids: torch.Tensor,
) -> torch.Tensor:
    """Standard Gumbel noise ``[..., v]`` keyed on (seed, step, sample, position, vocab id).

    Args:
        sample_ids: global sample indices, broadcastable with ``positions`` (e.g. ``[b, 1]``
            and ``[1, s]`` for a batch, or one entry per selected position).
        positions: positions in the sequence.
        vocab_ids: ``[v]`` *global* vocabulary ids of the local shard.
    """
    dev = vocab_ids.device
    h = _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=dev))
    h = _hash32(h ^ (step & _MASK32))
    h = _hash32(h ^ (sample_ids.to(dev, torch.int64) & _MASK32))
    h = _hash32(h ^ (positions.to(dev, torch.int64) & _MASK32))
    h = _hash32(h[..., None] ^ (vocab_ids.to(torch.int64) & _MASK32))  # [..., v]
    u = ((h >> 8).to(torch.float64) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), exact
    return (-torch.log(-torch.log(u))).to(torch.float32)


def _integer_probs(scaled: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Fixed-point probabilities ``round(exp(scaled - global max) * 2**40)`` (int64, exact sums)."""
    lead = scaled.shape[:-1]
    local_max = (
        scaled.amax(dim=-1).to(torch.float64)
        if scaled.shape[-1]
        else torch.full(lead, -math.inf, dtype=torch.float64, device=scaled.device)
    )
    gmax = all_reduce_(local_max, dist.ReduceOp.MAX, group)
    probs = torch.exp(scaled.to(torch.float64) - gmax[..., None])
    return torch.round(probs * float(1 << _FIXED_POINT_BITS)).to(torch.int64)


def _nucleus_threshold(q: torch.Tensor, top_p: float, group: ProcessGroup) -> torch.Tensor:
    """Largest integer threshold tau with mass(q >= tau) >= ceil(p * total), per row."""
    total = all_reduce_(q.sum(dim=-1), dist.ReduceOp.SUM, group)
    target = torch.ceil(total.to(torch.float64) * top_p).to(torch.int64).clamp(min=1)
    lo = torch.zeros_like(total)
    hi = torch.full_like(total, (1 << _FIXED_POINT_BITS) + 1)
    for _ in range(_FIXED_POINT_BITS + 2):
        mid = (lo + hi) // 2
        mass = torch.where(q >= mid[..., None], q, torch.zeros_like(q)).sum(dim=-1)
        ok = all_reduce_(mass, dist.ReduceOp.SUM, group) >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo


def sample(
    logits: torch.Tensor,
    vocab_size: int,
    *,
    temperature: float,
    seed: int,
    step: int,
    sample_ids: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    top_p: Optional[float] = None,
    group: ProcessGroup = None,
) -> torch.Tensor:
    """Temperature (optionally nucleus) sampling by Gumbel-max over ``logits [b, s, v/tp]``.

    ``sample_ids`` is ``[b]`` (one id per row) or ``[b, s]`` (one per entry); ``positions`` is
    ``[s]`` or ``[b, s]`` (default ``arange(s)``). Entries are processed in chunks of
    ``_SAMPLE_CHUNK`` so the noise never needs more than a chunk's worth of memory.
    """
    valid, start = _valid_view(logits, vocab_size, group)
    b, s = logits.shape[:2]
    dev = logits.device
    positions = torch.arange(s, device=dev) if positions is None else positions.to(dev)
    sample_ids = sample_ids.to(dev)
    sids = (sample_ids[:, None] if sample_ids.dim() == 1 else sample_ids).expand(b, s).reshape(-1)
    pos = (positions[None, :] if positions.dim() == 1 else positions).expand(b, s).reshape(-1)
    flat = valid.detach().reshape(b * s, valid.shape[-1])
    vocab_ids = torch.arange(start, start + valid.shape[-1], device=dev)
    out = []
    for c0 in range(0, b * s, _SAMPLE_CHUNK):
        c1 = min(c0 + _SAMPLE_CHUNK, b * s)
        scaled = flat[c0:c1].to(torch.float32) / temperature  # [chunk, v_local]
        scores = scaled + gumbel_noise(seed, step, sids[c0:c1], pos[c0:c1], vocab_ids)
        if top_p is not None:
            q = _integer_probs(scaled, group)
            tau = _nucleus_threshold(q, top_p, group)
            scores = scores.masked_fill(q < tau[..., None], -math.inf)
        out.append(_argmax_global(scores, start, group))
    if not out:
        return torch.zeros(b, s, dtype=torch.int64, device=dev)
    return torch.cat(out).reshape(b, s)


def estimate(
    logits: torch.Tensor,
    cfg: IFTConfig,
    vocab_size: int,
    *,
    step: int = 0,
    sample_ids: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    group: ProcessGroup = None,
) -> torch.Tensor:
    """The configured estimator on vocab-parallel ``logits [b, s, v/tp]``; returns ids ``[b, s]``.

    ``yhat[:, t]`` is the estimate of token ``t + 1`` (the model's guess for label ``t``).

    Args:
        vocab_size: the true (unpadded) vocabulary size; padded columns are never chosen.
        step: optimizer step (keys the sampling noise).
        sample_ids: ``[b]`` (or per-entry ``[b, s]``) global sample indices (keys the sampling
            noise); default ``arange(b)``.
        positions: ``[s]`` (or per-entry ``[b, s]``) sequence positions keying the noise;
            default ``arange(s)``. Per-entry keys let a caller pass only selected positions.
        group: the tensor-parallel group over which the vocabulary is split.
    """
    _, world = group_rank_world(group)
    if vocab_size > logits.shape[-1] * world:
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the logits' vocabulary "
            f"({logits.shape[-1]} x {world} ranks); the tokenizer does not match the model"
        )
    cfg.check_vocab(vocab_size)
    if cfg.estimator == "greedy":
        return greedy(logits, vocab_size, group)
    if cfg.estimator == "kth":
        return kth(logits, cfg.k, vocab_size, group)
    if sample_ids is None:
        sample_ids = torch.arange(logits.shape[0], device=logits.device)
    return sample(
        logits,
        vocab_size,
        temperature=cfg.temperature,
        seed=cfg.seed,
        step=step,
        sample_ids=sample_ids,
        positions=positions,
        top_p=cfg.top_p if cfg.estimator == "top_p" else None,
        group=group,
    )
