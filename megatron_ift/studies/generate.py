"""Greedy decoding from a trained ``megatron-ift train`` checkpoint, in one process on the CPU.

The model is loaded by :func:`megatron_ift.inference.loading.load_for_inference` (as
``megatron-ift generate`` does). No KV cache here: the study scores many short contexts that
share no prefix, so every new token re-runs the model on the whole (right-padded) batch, which
is cheap for its tiny models; chat-style decoding uses :mod:`megatron_ift.inference.decoder`.
Right padding never changes a row's logits at its last real position, because attention is
causal.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_ift.models.config import ModelConfig
from megatron_ift.platform import Platform

_INITIALISED = False


def world_of_one(platform: Platform) -> None:
    """A world of one with megatron-core's groups, for evaluating in this process (idempotent)."""
    global _INITIALISED
    if _INITIALISED:
        return
    from megatron_ift.distributed import init_distributed, model_parallel_seed
    from megatron_ift.parallel import ParallelConfig

    init_distributed(ParallelConfig(), platform)
    model_parallel_seed(0, platform)
    _INITIALISED = True


def _right_padded(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[b, s]`` right-padded to the longest sequence, and their positions ``[b, s]``."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(list(s), dtype=torch.int64)
    return tokens, torch.arange(width, dtype=torch.int64).expand(len(seqs), width)


class LoadedModel:
    """A trained GPT in evaluation mode.

    Args:
        run_dir: a run directory (its ``latest`` checkpoint) or an ``iter_*`` folder.
        platform: where this process computes.
    """

    def __init__(self, run_dir: str, platform: Platform) -> None:
        from megatron_ift.inference.loading import load_for_inference

        world_of_one(platform)
        self.cfg: ModelConfig
        self.model, self.cfg, _ = load_for_inference(run_dir, None, platform)
        self.vocab_size = self.cfg.vocab_size
        self.max_length = self.cfg.max_position_embeddings

    @torch.no_grad()
    def last_logits(self, seqs: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
        """Logits of the next token after each sequence: ``[n, vocab_size]`` (padding excluded).

        Raises:
            ValueError: a sequence is empty or longer than the model's positions.
        """
        lengths = [len(s) for s in seqs]
        if min(lengths) < 1 or max(lengths) > self.max_length:
            raise ValueError(f"sequence lengths must be in [1, {self.max_length}], got {lengths}")
        logits = self.model(*_right_padded(seqs, pad_id), None)  # [b, s, padded_vocab]
        last = torch.tensor(lengths) - 1
        return logits[torch.arange(len(seqs)), last, : self.vocab_size].float()  # [b, v]

    @torch.no_grad()
    def token_logprobs(self, seqs: Sequence[Sequence[int]], batch_size: int = 256) -> list[torch.Tensor]:
        """``log p(x[t+1] | x[:t+1])`` for every position of every sequence: ``[len - 1]`` each."""
        out: list[torch.Tensor] = []
        for lo in range(0, len(seqs), batch_size):
            chunk = seqs[lo: lo + batch_size]
            width = max(len(s) for s in chunk)
            if width > self.max_length:
                raise ValueError(f"a sequence of {width} tokens exceeds {self.max_length} positions")
            tokens, positions = _right_padded(chunk)
            logits = self.model(tokens, positions, None)[..., : self.vocab_size].float()  # [b, s, v]
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
            out += [logp[i, : len(s) - 1] for i, s in enumerate(chunk)]
        return out

    def greedy_next(self, seqs: Sequence[Sequence[int]], batch_size: int = 256) -> list[int]:
        """The argmax next token of every sequence (ties to the lowest id)."""
        out: list[int] = []
        for i in range(0, len(seqs), batch_size):
            out += self.last_logits(seqs[i : i + batch_size]).argmax(dim=-1).tolist()
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
                 batch_size: int = 256) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (each up to and including its first stop token,
        at most ``max_new_tokens``, never beyond the model's positions)."""
        stops = set(int(t) for t in stop_ids)
        outs: list[list[int]] = [[] for _ in prompts]
        for lo in range(0, len(prompts), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(prompts))))
            for _ in range(max_new_tokens):
                live = [i for i in idx if not (outs[i] and outs[i][-1] in stops)
                        and len(prompts[i]) + len(outs[i]) < self.max_length]
                if not live:
                    break
                nxt = self.greedy_next([list(prompts[i]) + outs[i] for i in live], batch_size)
                for i, t in zip(live, nxt):
                    outs[i].append(int(t))
                idx = live
        return outs


def frozen_lake_policy(model: LoadedModel, codec=None):
    """A :data:`~megatron_ift.studies.frozen_lake.BatchPolicy` acting greedily: the argmax over
    the whole vocabulary after an observation; anything but an action token is invalid."""
    from megatron_ift.studies.frozen_lake import Codec

    codec = codec or Codec()

    def policy(contexts: list[list[int]]) -> list[Optional[int]]:
        out: list[Optional[int]] = [None] * len(contexts)
        fits = [i for i, c in enumerate(contexts) if len(c) <= model.max_length]
        if fits:
            for i, t in zip(fits, model.greedy_next([contexts[i] for i in fits])):
                out[i] = codec.action_of(t)
        return out

    return policy
