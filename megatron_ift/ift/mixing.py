"""The estimated sequence (spec step 2) and the mixed input embeddings (step 3)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_ift.ift.weights import Groups


def estimated_sequence(
    tokens: torch.Tensor,
    estimates: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: Optional[torch.Tensor] = None,
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
    """
    xhat = tokens.clone()
    if tokens.shape[1] < 2:
        return xhat
    replace = loss_mask[:, :-1].bool()
    if segment_ids is not None:
        starts = Groups.build(loss_mask, segment_ids).segment_starts()
        replace = replace & ~starts[:, 1:]
    xhat[:, 1:] = torch.where(replace, estimates[:, :-1].to(tokens.dtype), tokens[:, 1:])
    return xhat


def mix_embeddings(
    embed: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    tokens_hat: torch.Tensor,
    lam: float,
    mode: str = "live",
) -> torch.Tensor:
    """``(1 - lam) * embed(x) + lam * embed(xhat)``.

    ``embed`` is the model's own (vocab-parallel) embedding stage, e.g. megatron-core's
    ``LanguageModelEmbedding`` with its position ids bound: it is linear in the word embedding,
    so mixing its outputs mixes the word embeddings and adds position embeddings once.

    Args:
        mode: ``live`` lets gradients reach the embedding table through both terms; ``detached``
            (reference parity) uses the current table's values with gradients stopped.
    """
    if lam == 0.0:
        out = embed(tokens)
        return out.detach() if mode == "detached" else out
    with torch.set_grad_enabled(torch.is_grad_enabled() and mode == "live"):
        out = (1.0 - lam) * embed(tokens) + lam * embed(tokens_hat)
    return out.detach() if mode == "detached" else out
