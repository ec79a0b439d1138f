"""Vocab-parallel log-probabilities of the labels (IFT step 4), never gathering the vocabulary.

Built from megatron-core's ``VocabParallelCrossEntropy`` steps, with the tensor-parallel group
passed in (megatron-core's own autograd function reads the global group) and float64 kept as
float64 (megatron-core casts to float32), so the same function serves training and the float64
oracle tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

from megatron_ift.ift._dist import ProcessGroup, all_reduce_, group_rank_world


class _VocabParallelNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):  # logits [..., v/tp], target [...]
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        rank, _ = group_rank_world(group)
        part = logits.shape[-1]
        start, end = rank * part, (rank + 1) * part
        logits_max = all_reduce_(logits.amax(dim=-1), dist.ReduceOp.MAX, group)
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target, logits_max, start, end
            )
        )
        all_reduce_(predicted, dist.ReduceOp.SUM, group)
        all_reduce_(sum_exp, dist.ReduceOp.SUM, group)
        softmax, nll = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted, sum_exp
        )
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return nll

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        )
        grad_input = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, update.to(grad_2d.dtype), grad_input,
            grad_output.to(grad_input.dtype),
        )
        return grad_input, None, None


def label_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: ProcessGroup = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``log_softmax(logits)[label]`` per position, computed vocab-parallel.

    Args:
        logits: local shard ``[..., v/tp]`` (any leading layout, e.g. ``[b, s]`` or ``[s, b]``).
        labels: global label ids ``[...]`` matching the leading dims.
        group: tensor-parallel group over which the vocabulary is split.
        inplace: allow overwriting ``logits`` (saves one vocab-sized buffer, as megatron-core
            does); only when nothing else reads them afterwards.

    Returns:
        log-probabilities ``[...]`` in float32 (float64 for float64 logits), differentiable.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}"
        )
    if not inplace and logits.dtype in (torch.float32, torch.float64):
        logits = logits.clone()
    return -_VocabParallelNLL.apply(logits, labels, group)


@torch.no_grad()
def label_logprobs_no_grad(logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """``log_softmax(logits)[label]`` for metrics (no gradient, logits untouched).

    One fused ``logsumexp`` pass per shard instead of the trainable path's max / subtract /
    exp / sum, combined across ranks from ``[...]``-sized partial results.
    """
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    rank, _ = group_rank_world(group)
    part = x.shape[-1]
    local_lse = torch.logsumexp(x, dim=-1)  # [...]
    gmax = all_reduce_(local_lse.clone(), dist.ReduceOp.MAX, group)
    total = all_reduce_(torch.exp(local_lse - gmax), dist.ReduceOp.SUM, group)
    lse = gmax + torch.log(total)
    local = labels - rank * part
    here = (local >= 0) & (local < part)
    picked = x.gather(-1, local.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1)
    label_logit = all_reduce_(torch.where(here, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)
    return label_logit - lse


def check_labels(labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int) -> None:
    """Raise if a trained label lies outside ``[0, vocab_size)`` (tokenizer/model mismatch)."""
    trained = labels[loss_mask.bool()]
    if trained.numel() and (int(trained.min()) < 0 or int(trained.max()) >= vocab_size):
        raise ValueError(
            f"labels contain ids in [{int(trained.min())}, {int(trained.max())}] but the model's "
            f"vocabulary has {vocab_size} entries: the tokenizer does not match the model "
            "(set model.vocab_size to the tokenizer's size, or use the model's tokenizer)"
        )
