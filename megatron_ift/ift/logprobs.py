"""Vocab-parallel log-probabilities of the labels (IFT step 4), never gathering the vocabulary.

One computation, two entry points:

* :func:`linear_label_logprobs` (training): the output layer fused in, in chunks of positions
  (the Liger / cut-cross-entropy idea inside megatron's vocab-parallel scheme): from hidden
  states ``[n, h]`` and the local weight shard ``[v/tp, h]`` it never holds more than
  ``chunk_size x v/tp`` logits, forward or backward. Backward recomputes each chunk's logits
  (one extra output-layer GEMM) unless everything fits in one chunk, where the forward's logits
  are kept (still within the bound).
* :func:`label_logprobs_no_grad` (metrics): from logits the estimation pass already holds.

Both reduce each shard to a per-position log-sum-exp and label logit and combine the shards with
three ``[n]``-sized all-reduces (:func:`_combine_shards`), whatever the chunking.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ift.ift.groups import ProcessGroup, all_reduce_, group_rank_world


def _label_index(labels: torch.Tensor, part: int, group: ProcessGroup):
    """Where each global label id lies in this rank's vocabulary shard of ``part`` columns:
    ``(index into the shard, clamped; whether the shard holds it)``."""
    rank, _ = group_rank_world(group)
    local = labels - rank * part
    here = (local >= 0) & (local < part)
    return local.clamp(0, part - 1), here


def _combine_shards(lse: torch.Tensor, picked: torch.Tensor, here: torch.Tensor,
                    group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``(log-probability of the label, log-sum-exp)`` per position from each shard's
    log-sum-exp ``lse [n]`` and label logit ``picked [n]`` (valid where ``here``)."""
    gmax = all_reduce_(lse.clone(), dist.ReduceOp.MAX, group)
    total = all_reduce_(torch.exp(lse - gmax), dist.ReduceOp.SUM, group)
    lse = gmax + torch.log(total)
    label_logit = all_reduce_(torch.where(here, picked, torch.zeros_like(picked)),
                              dist.ReduceOp.SUM, group)
    return label_logit - lse, lse


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden [c, h] @ weight[v/tp, h].T`` in the model's dtype, as float32 (float64 kept)."""
    z = hidden @ weight.t()
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


class _LinearLabelLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[label]`` per row, vocab-parallel, in position chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk):  # [n, h], [v/tp, h], [n]
        n = hidden.shape[0]
        index, here = _label_index(labels, weight.shape[0], group)
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
        logp, lse = _combine_shards(lse, picked, here, group)
        ctx.chunk = chunk
        ctx.save_for_backward(hidden, weight, lse, index, here, kept)
        return logp

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

    Equal to running the (column-parallel, bias-free) output layer and a log-softmax over the
    whole vocabulary, but no rank ever holds more than ``chunk_size x v/tp`` logits.

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
    """``log_softmax(logits)[label]`` for metrics, from vocab-parallel ``logits [..., v/tp]``
    (no gradient, logits untouched; float32, float64 kept)."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    index, here = _label_index(labels, x.shape[-1], group)
    picked = x.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return _combine_shards(torch.logsumexp(x, dim=-1), picked, here, group)[0]


def check_labels(labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int) -> None:
    """Raise if a trained label lies outside ``[0, vocab_size)`` (tokenizer/model mismatch)."""
    trained = labels[loss_mask.bool()]
    if trained.numel() and (int(trained.min()) < 0 or int(trained.max()) >= vocab_size):
        raise ValueError(
            f"labels contain ids in [{int(trained.min())}, {int(trained.max())}] but the model's "
            f"vocabulary has {vocab_size} entries: the tokenizer does not match the model "
            "(set model.vocab_size to the tokenizer's size, or use the model's tokenizer)"
        )
