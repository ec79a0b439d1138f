"""The IFT loss as (sum, count) pairs, so that micro-batches and data-parallel ranks reduce exactly.

The batch loss is ``total_sum / total_count`` over the *global* batch:

* ``sample_mean`` (reference): sum is the sum of per-sample losses ``L = sum_t(-p w) / n``,
  count is the number of samples with at least one trained token;
* ``token_mean`` (Megatron SFT): sum is ``sum_t(-p w)``, count the number of trained tokens.

Samples without a trained token (``n = 0``: all prompt, or padding rows) contribute nothing to
either sum or count, so they never produce NaN and never dilute the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ift.ift.config import IFTConfig
from megatron_ift.ift.weights import Groups, propagation_weights


def aggregate(
    token_losses: torch.Tensor, loss_mask: torch.Tensor, groups: Groups, aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of ``token_losses [b, s]`` (already zero where masked) for an aggregation."""
    mask = loss_mask.to(token_losses.dtype)
    if aggregation == "token_mean":
        return token_losses.sum(), mask.sum()
    n = groups.sum(mask)
    has = n > 0
    per_sample = groups.sum(token_losses) / torch.where(has, n, torch.ones_like(n))
    return (per_sample * has).sum(), has.sum().to(token_losses.dtype)


@dataclass(frozen=True)
class LossTerms:
    """One micro-batch's contribution. ``loss`` is differentiable; the rest are detached."""

    loss: torch.Tensor  # sum of the configured aggregation
    count: torch.Tensor  # its count
    mixed_sft: torch.Tensor  # unweighted loss of the same pass, same aggregation (sum)
    weight_max: torch.Tensor  # max weight in the micro-batch
    weight_entropy: torch.Tensor  # sum over samples of the entropy of w / n
    num_samples: torch.Tensor  # samples with n > 0
    num_tokens: torch.Tensor  # trained tokens


def ift_loss_terms(
    logps: torch.Tensor, loss_mask: torch.Tensor, cfg: IFTConfig, groups: Groups
) -> LossTerms:
    """IFT loss of one micro-batch from label log-probs ``logps [b, s]`` (spec steps 4-5)."""
    mask = loss_mask.to(logps.dtype)
    w = propagation_weights(logps, loss_mask, cfg, groups)
    loss_sum, count = aggregate(-logps * w * mask, loss_mask, groups, cfg.aggregation)
    with torch.no_grad():
        mixed_sft, _ = aggregate(-logps * mask, loss_mask, groups, cfg.aggregation)
        n = groups.sum(mask)
        q = w.detach() / n.clamp(min=1)[groups.index]
        ent = groups.sum(torch.where(q > 0, -q * torch.log(q), torch.zeros_like(q)))
        return LossTerms(
            loss=loss_sum,
            count=count,
            mixed_sft=mixed_sft,
            weight_max=w.detach().max() if w.numel() else torch.zeros((), dtype=w.dtype, device=w.device),
            weight_entropy=(ent * (n > 0)).sum(),
            num_samples=(n > 0).sum().to(logps.dtype),
            num_tokens=mask.sum(),
        )
