"""Single-process reference of the IFT method, written straight from docs/method.md.

A test oracle (it lives under ``tests/``, not in the package). Plain PyTorch on full-vocabulary
tensors in ``[batch, seq, vocab]`` layout, with explicit Python loops over samples and positions:
slow, obvious, float64 capable. It shares no code with the production path
(``megatron_ift.ift``) but one definition, the sampling estimators' noise
(:func:`megatron_ift.ift.estimators.gumbel_noise`, a hash keyed on (seed, step, sample,
position, vocabulary id) that the method fixes so that sampling does not depend on the layout);
the sampling rule around it (temperature, nucleus, Gumbel-max) is written here independently.
It is the oracle every parallel test compares against.

Conventions (spec): ``labels[t] = tokens[t + 1]``; ``loss_mask[t] = 1`` where ``labels[t]`` is an
answer token. ``segment_ids`` (optional ``[b, s]``) marks packed samples; every contiguous run of
equal ids is one sample. Documented choices beyond the spec, mirrored by the production code:

* a sample with ``n = 0`` trained tokens contributes nothing and is not counted in the mean;
* if all weights of a sample vanish (every item exactly 0), its weights fall back to uniform.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_ift.ift.config import IFTConfig


def _segments(row_ids: Optional[torch.Tensor], s: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of one row's segment ids (the whole row without ids)."""
    if row_ids is None:
        return [(0, s)]
    runs, start = [], 0
    for t in range(1, s + 1):
        if t == s or int(row_ids[t]) != int(row_ids[t - 1]):
            runs.append((start, t))
            start = t
    return runs


def estimated_tokens(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: IFTConfig,
    step: int = 0,
    *,
    segment_ids: Optional[torch.Tensor] = None,
    sample_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The estimated sequence ``xhat`` of spec step 2.

    Args:
        logits: ``[b, s, V]`` logits over the true vocabulary of the ground-truth pass.
        tokens: ``[b, s]`` input ids. loss_mask: ``[b, s]``. cfg: any estimator.
        step: the optimizer step (keys the sampling noise).
        segment_ids: ``[b, s]`` packed samples (a segment's first token keeps its id).
        sample_ids: ``[b]`` global row ids keying the sampling noise (default ``arange(b)``).
    """
    b, s, _ = logits.shape
    if sample_ids is None:
        sample_ids = torch.arange(b)
    out = tokens.clone()
    for i in range(b):
        seg_start = {start for start, _ in _segments(None if segment_ids is None else segment_ids[i], s)}
        for t in range(1, s):
            if loss_mask[i, t - 1] and t not in seg_start:
                out[i, t] = _estimate_one(logits[i, t - 1], cfg, step, int(sample_ids[i]), t - 1)
    return out


def _estimate_one(z: torch.Tensor, cfg: IFTConfig, step: int, sample_id: int, position: int) -> int:
    """One estimate from the logits ``z [V]`` at ``position`` of sample ``sample_id``."""
    if cfg.estimator in ("greedy", "kth"):
        order = torch.sort(z, descending=True, stable=True).indices  # ties: lowest id first
        return int(order[(1 if cfg.estimator == "greedy" else cfg.k) - 1])
    from megatron_ift.ift.estimators import gumbel_noise

    scaled = z.double() / cfg.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if cfg.estimator == "top_p":
        # The nucleus: the most likely tokens, in order, until their probability reaches p;
        # every token as likely as the last one taken is in it too.
        probs = torch.softmax(scaled, dim=0)
        ordered = torch.sort(probs, descending=True, stable=True).values
        last = int((torch.cumsum(ordered, 0) >= cfg.top_p).nonzero()[0]) if cfg.top_p < 1 else len(ordered) - 1
        keep = probs >= ordered[last]
    noise = gumbel_noise(cfg.seed, step, torch.tensor(sample_id), torch.tensor(position),
                         torch.arange(len(z))).double()
    return int(torch.where(keep, scaled + noise, torch.tensor(-math.inf, dtype=torch.float64)).argmax())


def _discounted(items: list[torch.Tensor], gamma: float, reverse: bool) -> list[torch.Tensor]:
    n = len(items)
    out = []
    for t in range(n):
        ks = range(t, n) if not reverse else range(0, t + 1)
        terms = [gamma ** abs(k - t) * items[k] for k in ks]
        out.append(torch.stack(terms).sum())
    return out


def ift_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: IFTConfig,
    segment_ids: Optional[torch.Tensor] = None,
    microbatch_rows: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """IFT loss (spec steps 4-5) and metrics for the optimisation pass.

    ``microbatch_rows``: the rows are micro-batches of this many rows (default: one micro-batch).
    Only ``propagation_side: right`` depends on it (its shift is a micro-batch's minimum); the
    loss is the whole batch's either way.

    Returns:
        ``(loss, metrics)``: the batch loss under ``cfg.aggregation`` (differentiable) and a
        dict with ``loss_mixed_sft``, ``weight_max``, ``weight_entropy``, ``num_samples``.
    """
    b, s, _ = logits.shape
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [b, s]
    mask = loss_mask.to(logps.dtype)

    samples = []  # (row, start, end)
    for i in range(b):
        for start, end in _segments(None if segment_ids is None else segment_ids[i], s):
            samples.append((i, start, end))

    # Per-sample discounted sums c (list of per-position scalars).
    per_sample_c = []
    for i, start, end in samples:
        m = [mask[i, t] for t in range(start, end)]
        n = sum(float(x) for x in m)
        p = logps[i, start:end].detach() if cfg.detach_weights else logps[i, start:end]
        items = []
        for j, t in enumerate(range(start, end)):
            if cfg.propagation_type == "loss":
                a = -p[j] / n if n > 0 else torch.zeros((), dtype=logps.dtype)
            elif cfg.propagation_type == "logps":
                a = -p[j]
            else:
                a = torch.ones((), dtype=logps.dtype)
            items.append(a * m[j])
        c = _discounted(items, cfg.gamma, reverse=cfg.propagation_side == "right")
        if cfg.propagation_side == "right":
            c = [c[j] if m[j] > 0 else torch.tensor(1e6, dtype=logps.dtype) for j in range(len(c))]
        per_sample_c.append(c)

    if cfg.propagation_side == "right":  # the smallest non-zero c of each micro-batch, added
        rows = microbatch_rows or b
        for lo in range(0, b, rows):
            members = [k for k, (i, _, _) in enumerate(samples) if lo <= i < lo + rows]
            cmin = torch.stack([x for k in members for x in per_sample_c[k] if float(x) != 0.0]).min()
            for k in members:
                per_sample_c[k] = [x + cmin for x in per_sample_c[k]]

    losses, mixed, counts_tokens, entropies, wmax = [], [], [], [], []
    total_weighted = torch.zeros((), dtype=logps.dtype)
    for (i, start, end), c in zip(samples, per_sample_c):
        m = mask[i, start:end]
        n = float(m.sum())
        if cfg.gamma == 0.0:
            w = m.clone()
        else:
            c = torch.stack(c)
            left = cfg.propagation_side == "left"
            if cfg.propagation_norm == "L1":
                w = c if left else 1.0 / c
            elif cfg.propagation_norm == "L2":
                w = c**2 if left else 1.0 / c**2
            elif cfg.propagation_norm == "log":
                w = torch.log(c + 1) if left else 1.0 / torch.log(c + 1)
            else:
                v = c if left else 1.0 / c
                trained = [j for j in range(len(v)) if m[j] > 0]
                w = torch.zeros_like(v)
                if trained:
                    sm = torch.softmax(v[trained], dim=0)
                    w = w.index_put((torch.tensor(trained),), sm)
            w = w * m
            total = w.sum()
            w = w * n / total if float(total) > 0 else m.clone()
        if n == 0:
            continue
        lp = logps[i, start:end]
        weighted = (-lp * w * m).sum()
        total_weighted = total_weighted + weighted
        losses.append(weighted / n)
        mixed.append((-lp * m).sum().detach())
        counts_tokens.append(n)
        q = (w / n).detach()
        entropies.append(float(sum(-x * math.log(x) for x in q.tolist() if x > 0)))
        wmax.append(float(w.detach().max()))

    if not losses:
        loss = (logps * 0).sum()
        mixed_sft = 0.0
    elif cfg.aggregation == "sample_mean":
        loss = torch.stack(losses).mean()
        mixed_sft = float(sum(float(x) / n for x, n in zip(mixed, counts_tokens)) / len(losses))
    else:
        loss = total_weighted / sum(counts_tokens)
        mixed_sft = float(sum(float(x) for x in mixed) / sum(counts_tokens))
    metrics = {
        "loss_mixed_sft": mixed_sft,
        "weight_max": max(wmax) if wmax else 0.0,
        "weight_entropy": sum(entropies) / len(entropies) if entropies else 0.0,
        "num_samples": float(len(losses)),
    }
    return loss, metrics


def mixed_inputs(
    embedding: torch.Tensor, tokens: torch.Tensor, tokens_hat: torch.Tensor, lam: float
) -> torch.Tensor:
    """``(1 - lam) * E[x] + lam * E[xhat]`` for a full embedding table ``E [V, h]``."""
    return (1.0 - lam) * embedding[tokens] + lam * embedding[tokens_hat]


# -- the output layer's label log-probs (for the fused, chunked path) --------------------------

#: Tolerances of the fused log-prob tests, relative to the largest entry.
LOGPROB_TOL = {"torch.float64": 1e-12, "torch.float32": 1e-5}


def output_layer_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unfused: the output-layer GEMM, ``log_softmax``, the labels' log-probs ``[n]``; and the
    gradients of ``hidden [n, h]`` and ``weight [v, h]`` under the upstream gradient ``[n]``."""
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp = torch.log_softmax(x @ w.t(), dim=-1).gather(-1, labels[:, None])[:, 0]
    (lp * upstream).sum().backward()
    return lp.detach(), x.grad, w.grad


def close_relative(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """``max |a - b| <= tol x max(1, max |b|)``."""
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))
