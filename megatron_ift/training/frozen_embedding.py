"""One rule, its one home: with IFT's ``detached`` mixing embeddings an untied input embedding
never trains.

``mixing_embeddings: detached`` (the reference trainer's behaviour, see ``docs/method.md``) builds
the mixed input from the embedding table's values with gradients stopped, so no gradient
reaches an *untied* input embedding: it is frozen when the model is built
(:func:`freeze_input_embedding`, called by :func:`megatron_ift.training.engine.build_model`
before DDP wraps the model, so neither DDP buckets nor the optimizer hold it), and a step built
on a model that was not frozen is refused (:func:`check_input_embedding`, called by
:class:`megatron_ift.training.step.IFTStep`). A tied table still trains through the output layer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_ift.checkpoint.model_io import unwrap


def input_embedding_frozen(mixing_embeddings: str, tied: bool) -> bool:
    """The rule: the input embedding is frozen iff mixing is ``detached`` and the table is untied.

    Args:
        mixing_embeddings: ``IFTConfig.mixing_embeddings`` (``live`` or ``detached``).
        tied: the input embedding shares its weight with the output layer.

    Returns:
        True when the input embedding must not train.
    """
    return mixing_embeddings == "detached" and not tied


def _input_embeddings(chunks: Sequence[torch.nn.Module]):
    """(word-embedding module, tied) of every chunk that holds the input embedding."""
    for c in chunks:
        bare = unwrap(c)
        if bare.pre_process:
            yield bare.embedding.word_embeddings, bool(bare.share_embeddings_and_output_weights)


def freeze_input_embedding(chunks: Sequence[torch.nn.Module], mixing_embeddings: str) -> None:
    """Apply the rule to bare model chunks (before DDP wraps them), in place.

    Args:
        chunks: this rank's model chunks.
        mixing_embeddings: ``IFTConfig.mixing_embeddings``.
    """
    for emb, tied in _input_embeddings(chunks):
        if input_embedding_frozen(mixing_embeddings, tied):
            for p in emb.parameters():
                p.requires_grad_(False)


def check_input_embedding(chunks: Sequence[torch.nn.Module], mixing_embeddings: str) -> None:
    """Refuse chunks whose input embedding should be frozen by the rule and is not.

    Raises:
        ValueError: ``detached`` mixing with an untied input embedding that still trains.
    """
    for emb, tied in _input_embeddings(chunks):
        if input_embedding_frozen(mixing_embeddings, tied) and any(
            p.requires_grad for p in emb.parameters()
        ):
            raise ValueError(
                "mixing_embeddings='detached' with untied embeddings: build the model with "
                "training.engine.build_model(..., mixing_embeddings='detached'), which freezes "
                "the input embedding (it never trains in the reference)"
            )
