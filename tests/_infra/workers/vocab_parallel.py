"""Vocab-parallel label log-probs built from megatron-core's own ``VocabParallelCrossEntropy``
steps: an independent implementation that tests compare the package's fused path with (the
package keeps one path, :mod:`megatron_ift.ift.logprobs`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

from megatron_ift.ift.groups import ProcessGroup, all_reduce_, group_rank_world


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


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """``log_softmax(logits)[label]`` per position from vocab-parallel logits ``[..., v/tp]``
    (float32; float64 kept), differentiable."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}"
        )
    if logits.dtype in (torch.float32, torch.float64):
        logits = logits.clone()
    return -_VocabParallelNLL.apply(logits, labels, group)
