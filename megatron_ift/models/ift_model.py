"""megatron-core's ``GPTModel`` with the entry points the IFT step calls.

IFT needs two things a plain ``GPTModel.forward`` does not offer:

* **a mixed input**: the first stage feeds ``(1 - lambda) E[x] + lambda E[xhat]`` where ``E`` is the
  model's own (vocab-parallel) word-embedding table. :meth:`IFTGPTModel.embed_tokens` looks ids
  up in that table; the step mixes the two lookups (:func:`megatron_ift.ift.mix_embeddings`)
  and hands the result to :meth:`IFTGPTModel.hidden_states`, which runs the rest of the embedding
  stage (position embeddings, the sequence-parallel scatter, embedding dropout: once, on the
  mixed input) and the decoder.
* **hidden states, not logits, at chosen positions**: the loss needs the output layer only where
  a label is trained (the answer tokens), fused with the vocab-parallel log-probs in chunks
  (:func:`megatron_ift.ift.logprobs.linear_label_logprobs`), so the last stage returns the final
  hidden states at those positions ``[n, h]`` and :meth:`output_weight` gives the weight to
  apply. Prompt and padding rows never reach the vocabulary GEMM, and no ``[b, s, v/tp]``
  logits exist.

``forward`` is megatron-core's, unchanged (generation, conversion checks). Checkpoint keys are
``GPTModel``'s: this class adds no parameters.

Tensor parallelism at the selection: the rows are gathered from the sequence-parallel shards
(backward: reduce-scatter) or passed through ``copy_to_tensor_model_parallel_region`` (backward:
all-reduce), which is what the output layer itself would do with its input: every TP rank
computes a partial input gradient from its vocabulary shard.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


class IFTGPTModel(GPTModel):
    """A ``GPTModel`` chunk (same constructor) that the IFT step calls through
    :meth:`embed_tokens`, :meth:`hidden_states` and :meth:`output_weight`."""

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings of ``ids [b, s]`` from this (first-stage) chunk's vocab-parallel table.

        Returns:
            ``[b, s, h]``; ``[s/tp, b, h]`` under sequence parallelism without position
            embeddings, where megatron-core's table reduce-scatters its output itself.
        """
        return self.embedding.word_embeddings(ids)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        *,
        positions: torch.Tensor,
        word_embeddings: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """Run this chunk: the embedding stage (first chunk), the decoder, the selection (last).

        Args:
            tokens, position_ids: ``[b, s]``.
            attention_mask: megatron's boolean mask (True = masked) for packed rows on the local
                spec, or None (causal).
            positions: ``[n]`` flat indices into the sequence-first ``[s, b]`` layout of the
                positions whose final hidden states the last stage returns.
            word_embeddings: the first chunk's input word embeddings (the mixed input, laid out
                as :meth:`embed_tokens` returns them); default: ``embed_tokens(tokens)``.
            packed_seq_params: THD packed rows (Transformer Engine spec).

        Returns:
            Last chunk: the final hidden states at ``positions``, ``[n, h]``, identical on every
            TP rank. Other chunks: the decoder output ``[s(/tp), b, h]``, which the pipeline
            schedule sends on.
        """
        decoder_input = None
        if self.pre_process:
            words = self.embed_tokens(tokens) if word_embeddings is None else word_embeddings
            decoder_input = self.embedding_stage(words, position_ids)
        preprocessed = self._preprocess(
            input_ids=tokens, position_ids=position_ids, decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )
        decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset = preprocessed[:5]
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )  # [s(/tp), b, h], final norm applied on the last chunk
        if not self.post_process:
            return hidden
        return self._select(hidden, positions, tokens.shape)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight ``[v/tp, h]`` (the word-embedding table when tied).

        The weight is applied without calling the output layer module, so its forward pre-hooks
        run here: megatron DDP's overlapped parameter all-gather
        (``overlap_param_gather``) waits for a parameter's gather in a pre-hook of the module
        that owns it.
        """
        layer = self.output_layer
        for hook in layer._forward_pre_hooks.values():
            hook(layer, ())
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return layer.weight

    @torch.no_grad()
    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits ``[n, v/tp]`` of hidden rows ``[n, h]`` (no gradient: the
        estimation pass; training goes through the fused log-probs)."""
        return torch.matmul(hidden, self.output_weight().t())

    def embedding_stage(self, words: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The first chunk's decoder input from word embeddings (laid out as :meth:`embed_tokens`
        returns them): megatron-core 0.16.1's ``LanguageModelEmbedding.forward`` after its word
        lookup (position embeddings, ``[b, s, h] -> [s, b, h]``, the sequence-parallel scatter,
        embedding dropout). The tests check it against that module on the same ids, bit for bit."""
        emb = self.embedding
        x = words
        if emb.add_position_embedding:
            x = x + emb.position_embeddings(position_ids)
        if not emb.reduce_scatter_embeddings:
            x = x.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
        if self.config.fp32_residual_connection:
            x = x.float()
        if not self.config.sequence_parallel:
            return emb.embedding_dropout(x)
        if not emb.reduce_scatter_embeddings and emb.scatter_to_sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x, group=emb.tp_group)
        if self.config.clone_scatter_output_in_embedding and emb.scatter_to_sequence_parallel:
            x = x.clone()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return emb.embedding_dropout(x)

    # -- pieces -----------------------------------------------------------------------------

    def _select(self, hidden: torch.Tensor, positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Hidden rows at ``positions`` (sequence-first flat indices) ``[n, h]``, with the TP
        reduction of their gradient that the output layer would have done."""
        sequence_parallel = self.config.sequence_parallel
        tp_group = self.output_layer.tp_group
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)  # [s, b, h]
        s, b, h = hidden.shape
        if (b, s) != tuple(shape):
            raise RuntimeError(f"decoder output covers (b, s) = {(b, s)}, the inputs {tuple(shape)}")
        rows = hidden.reshape(s * b, h).index_select(0, positions)  # [n, h]
        if not sequence_parallel:
            rows = copy_to_tensor_model_parallel_region(rows, group=tp_group)
        return rows
