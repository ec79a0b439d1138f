"""How the next token is chosen from a row of logits: greedy, temperature, top-p (nucleus)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ift.validation import check_positive_int, check_range


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Decoding options of ``megatron-ift generate``."""

    max_new_tokens: int = 128
    """Tokens generated per prompt at most (fewer when a stop token comes first)."""
    temperature: float = 0.0
    """0: greedy (argmax, ties to the lowest id); > 0: sample from softmax(logits / T)."""
    top_p: float = 1.0
    """Sampling only: keep the smallest set of most likely tokens whose probability reaches
    this (1.0: the whole vocabulary)."""
    seed: int = 0
    """Seed of the sampling generator (results repeat for a seed, whatever the TP/PP layout)."""

    def __post_init__(self) -> None:
        check_positive_int("max_new_tokens", self.max_new_tokens)
        check_range("temperature", self.temperature, 0.0)
        check_range("top_p", self.top_p, 0.0, 1.0, low_inclusive=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator) -> torch.Tensor:
    """The next token of each row.

    Args:
        logits: ``[b, v]`` over the true vocabulary (padding columns removed).
        cfg: the decoding options.
        generator: the sampling generator (unused when greedy).

    Returns:
        ``[b]`` int64 token ids.
    """
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)  # [b, v]
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= cfg.top_p, 0.0)  # keeps the first
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
