"""The estimated sequence (spec step 2) and the mixed input embeddings (step 3)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

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


@contextlib.contextmanager
def mixed_word_embeddings(
    word_embeddings: torch.nn.Module,
    tokens_hat: torch.Tensor,
    lam: float,
    mode: str = "live",
) -> Iterator[None]:
    """Within the block, ``word_embeddings(x)`` returns ``(1 - lam) * E[x] + lam * E[xhat]``.

    ``word_embeddings`` is the model's own (vocab-parallel) table, e.g. megatron-core's
    ``LanguageModelEmbedding.word_embeddings``; a forward hook mixes its output, so everything
    the embedding stage does after the lookup (position embeddings, the sequence-parallel
    scatter, embedding dropout with one mask) runs once, on the mixed input.

    Args:
        tokens_hat: ``xhat``, same shape as the ids the table is called with inside the block.
        mode: ``live`` lets gradients reach the table through both terms; ``detached``
            (reference parity) uses the current table's values with gradients stopped.
    """
    if mode not in ("live", "detached"):
        raise ValueError(f"mixing mode {mode!r} is not 'live' or 'detached'")

    def hook(module, args, output):
        ids = args[0] if args else None
        if ids is None or tuple(ids.shape) != tuple(tokens_hat.shape):
            raise RuntimeError(
                "mixed_word_embeddings: the table was called with ids of shape "
                f"{None if ids is None else tuple(ids.shape)}, not xhat's {tuple(tokens_hat.shape)}"
            )
        live = mode == "live"
        with torch.set_grad_enabled(torch.is_grad_enabled() and live):
            # module.forward, not module(...): the hook must not fire again for xhat.
            mixed = output if lam == 0.0 else (1.0 - lam) * output + lam * module.forward(tokens_hat)
        return mixed if live else mixed.detach()

    handle = word_embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
