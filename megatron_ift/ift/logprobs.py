"""Vocab-parallel log-probabilities of the labels (IFT step 4), never gathering the vocabulary.

Two trainable paths:

* :func:`label_logprobs` from logits the output layer already produced, built from
  megatron-core's ``VocabParallelCrossEntropy`` steps, with the tensor-parallel group passed in
  (megatron-core's own autograd function reads the global group) and float64 kept as float64
  (megatron-core casts to float32), so the same function serves training and the float64 oracle
  tests;
* :func:`linear_label_logprobs`, the output layer fused in, in chunks of positions (the
  Liger / cut-cross-entropy idea inside megatron's vocab-parallel scheme): from hidden states
  ``[n, h]`` and the local weight shard ``[v/tp, h]`` it never holds more than
  ``chunk_size x v/tp`` logits, forward or backward. Backward recomputes each chunk's logits
  (one extra output-layer GEMM) unless everything fits in one chunk, where the forward's
  logits are kept (still within the bound).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ift.ift._dist import ProcessGroup, all_reduce_, group_rank_world


def _vpce():
    """megatron-core's ``VocabParallelCrossEntropy``, imported on first use: importing
    ``megatron_ift.ift`` (which the config sections do) must not import megatron-core."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    return VocabParallelCrossEntropy


class _VocabParallelNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):  # logits [..., v/tp], target [...]
        VocabParallelCrossEntropy = _vpce()
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
        VocabParallelCrossEntropy = _vpce()
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


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden [c, h] @ weight[v/tp, h].T`` in the model's dtype, as float32 (float64 kept)."""
    z = hidden @ weight.t()
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


class _LinearLabelLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[label]`` per row, vocab-parallel, in position chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk):  # [n, h], [v/tp, h], [n]
        rank, _ = group_rank_world(group)
        part = weight.shape[0]
        n = hidden.shape[0]
        local = labels - rank * part
        here = (local >= 0) & (local < part)
        index = local.clamp(0, part - 1)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        picked = torch.empty(n, dtype=acc, device=hidden.device)
        kept = None
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            z = _chunk_logits(hidden[lo:hi], weight)  # [c, v/tp]
            lse[lo:hi] = torch.logsumexp(z, dim=-1)
            picked[lo:hi] = z.gather(-1, index[lo:hi, None])[:, 0]
            if n <= chunk:
                kept = z  # one chunk: keep it for backward instead of recomputing
        # Combine the shards' partial results: three [n]-sized all-reduces, whatever the chunks.
        gmax = all_reduce_(lse.clone(), dist.ReduceOp.MAX, group)
        total = all_reduce_(torch.exp(lse - gmax), dist.ReduceOp.SUM, group)
        lse = gmax + torch.log(total)
        label_logit = all_reduce_(torch.where(here, picked, torch.zeros_like(picked)),
                                  dist.ReduceOp.SUM, group)
        ctx.chunk = chunk
        ctx.save_for_backward(hidden, weight, lse, index, here, kept)
        return label_logit - lse

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [n]
        hidden, weight, lse, index, here, kept = ctx.saved_tensors
        n, chunk = hidden.shape[0], ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        g = grad_out.to(lse.dtype)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            z = kept if kept is not None else _chunk_logits(hidden[lo:hi], weight)
            # d logp / dz = onehot(label) - softmax(z): written over z (not needed afterwards).
            grad_z = z.sub_(lse[lo:hi, None]).exp_().mul_(-g[lo:hi, None])
            rows = torch.arange(hi - lo, device=z.device)
            grad_z[rows, index[lo:hi]] += torch.where(here[lo:hi], g[lo:hi], torch.zeros_like(g[lo:hi]))
            grad_z = grad_z.to(hidden.dtype)
            if need_h:
                grad_h[lo:hi] = grad_z @ weight
            if need_w:
                grad_w += (grad_z.t() @ hidden[lo:hi]).to(grad_w.dtype)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def linear_label_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group: ProcessGroup = None,
    *,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[label]`` per row, the output layer fused in, chunked.

    Equal to running the (column-parallel, bias-free) output layer and then
    :func:`label_logprobs`, but no rank ever holds more than ``chunk_size x v/tp`` logits.

    Args:
        hidden: ``[n, h]`` output-layer inputs, identical on every TP rank. Their gradient is
            this rank's partial sum over its vocabulary shard: the caller reduces it over TP
            (megatron-core's ``copy_to_tensor_model_parallel_region`` before the call, or the
            reduce-scatter of a sequence-parallel gather), as the output layer itself would.
        weight: the local output-layer (or tied embedding) shard ``[v/tp, h]``.
        labels: global label ids ``[n]``.
        group: tensor-parallel group over which the vocabulary is split.
        chunk_size: positions per chunk (>= 1).

    Returns:
        log-probabilities ``[n]`` in float32 (float64 for float64 inputs), differentiable with
        respect to ``hidden`` and ``weight``.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(
            f"linear_label_logprobs needs hidden [n, h], weight [v/tp, h], labels [n]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return _LinearLabelLogprobs.apply(hidden, weight, labels, group, int(chunk_size))


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
