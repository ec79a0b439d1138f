"""The estimated sequence (spec step 2) and the mixed input embeddings (step 3)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ift.ift.weights import Groups


def estimated_sequence(
    tokens: torch.Tensor,
    estimates: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: Optional[torch.Tensor] = None,
    *,
    groups: Optional[Groups] = None,
) -> torch.Tensor:
    """``xhat [b, s]``: answer tokens replaced by the model's estimates, prompts kept.

    ``xhat[t] = estimates[t - 1]`` where ``loss_mask[t - 1] = 1`` and ``t`` is not the first token
    of a sample/segment; otherwise ``xhat[t] = tokens[t]``.

    Args:
        tokens: input ids ``x [b, s]``.
        estimates: ``yhat`` shifted as the estimators return it: ``estimates[t]`` guesses
            ``x[t + 1]`` (i.e. label ``t``).
        loss_mask: ``[b, s]`` Megatron-convention mask over labels.
        segment_ids: optional ``[b, s]`` packed-segment ids.
        groups: the micro-batch's :class:`Groups`, if already built (instead of
            ``segment_ids``; building them needs a host sync on a GPU).
    """
    xhat = tokens.clone()
    if tokens.shape[1] < 2:
        return xhat
    replace = loss_mask[:, :-1].bool()
    if groups is None and segment_ids is not None:
        groups = Groups.build(loss_mask, segment_ids)
    if groups is not None:
        replace = replace & ~groups.segment_starts()[:, 1:]
    xhat[:, 1:] = torch.where(replace, estimates[:, :-1].to(tokens.dtype), tokens[:, 1:])
    return xhat


def mix_embeddings(
    embedded: torch.Tensor,
    embedded_hat: Optional[torch.Tensor],
    lam: float,
    mode: str = "live",
) -> torch.Tensor:
    """The mixed input ``(1 - lam) * E[x] + lam * E[xhat]`` (spec step 3).

    Args:
        embedded: ``E[x]``, the word embeddings of the ground-truth tokens (any layout).
        embedded_hat: ``E[xhat]`` in the same layout; may be None when ``lam == 0``.
        lam: the mixing coefficient.
        mode: ``live`` lets gradients reach the table through both terms; ``detached``
            (reference parity) uses the table's current values with gradients stopped.

    Returns:
        The mixed embeddings, ``embedded``'s shape and dtype.
    """
    if mode not in ("live", "detached"):
        raise ValueError(f"mixing mode {mode!r} is not 'live' or 'detached'")
    if lam == 0.0:
        mixed = embedded
    else:
        if embedded_hat is None:
            raise ValueError(f"lambda={lam} needs the estimated tokens' embeddings")
        mixed = (1.0 - lam) * embedded + lam * embedded_hat
    return mixed if mode == "live" else mixed.detach()
