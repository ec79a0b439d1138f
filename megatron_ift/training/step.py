"""The two-pass IFT step on megatron-core's pipeline schedules (1F1B and interleaved).

Pass 1 (estimation, skipped when lambda = 0): forward-only over every micro-batch of the step,
under ``no_grad`` with dropout off; the last pipeline stage turns its vocab-parallel logits into
estimated token ids (nothing else is kept) and sends them to the first stage.

Pass 2 (optimisation): the normal schedule; the first stage feeds the mixed embeddings
``(1 - lambda) * E[x] + lambda * E[xhat]`` (mixed at the model's own table lookup, then one pass
of its embedding stage) through ``GPTModel.forward(decoder_input=...)``, the last
stage computes the IFT loss from vocab-parallel log-probs of the trained positions only (the
output layer skipped and fused with the log-probs, in chunks of ``ift.logprob_chunk_size``
positions: :func:`megatron_ift.training.output_selection.fused_output_positions`). The loss function returns
``(sum, count, report)`` and the schedule runs with ``calculate_per_token_loss``, so
``finalize_model_grads`` divides the gradients by the count summed over micro-batches and
data-parallel ranks: the step optimises ``total_sum / total_count`` of the *global* batch,
independent of how samples are split (per-sample or per-token mean, ``IFTConfig.aggregation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ift.checkpoint.model_io import unwrap
from megatron_ift.data.packing import attention_mask
from megatron_ift.device import compute_device, no_host_sync
from megatron_ift.ift import (
    IFTConfig,
    aggregate,
    check_labels,
    estimate,
    estimated_sequence,
    ift_loss_terms,
    label_logprobs_no_grad,
    lambda_at,
    mixed_word_embeddings,
)
from megatron_ift.training.frozen_embedding import check_input_embedding
from megatron_ift.training.microbatch import MicroBatch, prepare_microbatches
from megatron_ift.ift.logprobs import linear_label_logprobs
from megatron_ift.training.output_selection import (
    fused_output_positions,
    selected_output_positions,
)

# Order of the summed metrics in the reduction buffer.
_SUM_KEYS = (
    "loss_sum", "count", "mixed_sft_sum", "weight_entropy_sum", "num_samples", "num_tokens",
    "sft_sum", "sft_count", "est_correct", "est_total",
)
_OPT_KEYS = _SUM_KEYS[:6]  # reported by the optimisation pass
_EST_KEYS = _SUM_KEYS[6:]  # reported by the estimation pass


def _unused_collect(output: torch.Tensor, non_loss_data: bool = True) -> None:
    """Non-last pipeline stages: the schedule never calls this (their output is sent on)."""
    return None


@dataclass(frozen=True)
class StepOutput:
    """What one step reports (identical on every rank)."""

    loss: float  # the IFT loss of the global batch
    metrics: dict[str, float]


class IFTStep:
    """Runs one IFT (or SFT) step over a list of micro-batches on this rank's model chunks.

    Args:
        chunks: this rank's model chunks (megatron DDP-wrapped or bare ``GPTModel``), in virtual
            pipeline order.
        cfg: the IFT options.
        vocab_size: the true vocabulary size (padded entries are never estimated).
        seq_length, micro_batch_size: shapes of every micro-batch (pipeline p2p buffers).
        thd: packed rows reach attention as Transformer Engine THD sequences
            (``packed_seq_params``) rather than a dense mask (the TE layer spec).

    Device discipline: micro-batches arrive on the host and are moved to the compute device
    once, with their data-dependent metadata computed on the host first
    (:mod:`megatron_ift.training.microbatch`); every metric stays a device tensor until one
    reduction per step, so the micro-batch loop never waits for the device.
    """

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        cfg: IFTConfig,
        vocab_size: int,
        *,
        seq_length: int,
        micro_batch_size: int,
        thd: bool = False,
    ) -> None:
        self.chunks = list(chunks)
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.thd = thd
        self.device = compute_device()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        config = unwrap(self.chunks[0]).config
        if not config.calculate_per_token_loss:
            # The loss function returns (sum, count): the schedule must not divide it.
            raise ValueError("IFTStep needs a model built by training.engine.build_model "
                             "(its TransformerConfig sets calculate_per_token_loss)")
        check_input_embedding(self.chunks, cfg.mixing_embeddings)

    # -- public -------------------------------------------------------------------------------

    def __call__(self, microbatches: Sequence[MicroBatch], step: int, *, forward_only: bool = False) -> StepOutput:
        """Estimation pass (if lambda > 0) then the optimisation pass over ``microbatches``.

        Gradients are accumulated into the chunks (megatron DDP ``main_grad``); the caller zeroes
        them before and runs the optimizer after. ``forward_only`` evaluates without gradients.
        """
        self._validate(microbatches)  # on the host, before anything reaches the device
        lam = lambda_at(self.cfg, step)
        microbatches = prepare_microbatches(microbatches, self.device, thd=self.thd)
        # [len(_SUM_KEYS)] sums and the weight maximum, on the device until _reduce.
        sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=self.device)
        weight_max = torch.zeros((), dtype=torch.float64, device=self.device)

        estimates: list[Optional[torch.Tensor]] = [None] * len(microbatches)
        if lam > 0.0:
            estimates = self._estimation_pass(microbatches, step, sums)

        fb = get_forward_backward_func()
        with no_host_sync("the optimisation pass's micro-batch loop"):
            reports = fb(
                forward_step_func=partial(self._optimisation_forward, estimates=estimates, lam=lam),
                data_iterator=self._iterators(microbatches),
                model=self.chunks,
                num_microbatches=len(microbatches),
                seq_length=self.seq_length,
                micro_batch_size=self.micro_batch_size,
                forward_only=forward_only,
            )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for rep in reports:
                sums[: len(_OPT_KEYS)] += torch.stack([rep[k] for k in _OPT_KEYS]).to(torch.float64)
                weight_max = torch.maximum(weight_max, rep["weight_max"].to(torch.float64))
            if lam == 0.0:  # the optimisation pass *is* the ground-truth pass
                sums[_SUM_KEYS.index("sft_sum")] = sums[_SUM_KEYS.index("mixed_sft_sum")]
                sums[_SUM_KEYS.index("sft_count")] = sums[_SUM_KEYS.index("count")]
        return self._reduce(sums, weight_max, lam)

    # -- pass 1 -------------------------------------------------------------------------------

    def _estimation_pass(self, microbatches, step, sums) -> list[Optional[torch.Tensor]]:
        fb = get_forward_backward_func()
        modes = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()  # dropout off
        try:
            with torch.no_grad(), no_host_sync("the estimation pass's micro-batch loop"):
                out = fb(
                    forward_step_func=partial(self._estimation_forward, step=step),
                    data_iterator=self._iterators(microbatches),
                    model=self.chunks,
                    num_microbatches=len(microbatches),
                    seq_length=self.seq_length,
                    micro_batch_size=self.micro_batch_size,
                    forward_only=True,
                    collect_non_loss_data=True,
                )
        finally:
            for c, m in zip(self.chunks, modes):
                c.train(m)
        ids = None
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            ids = torch.stack([o["ids"] for o in out])  # [m, b, s]
            for o in out:
                sums[len(_OPT_KEYS):] += torch.stack([o[k] for k in _EST_KEYS]).to(torch.float64)
        ids = self._send_estimates_to_first_stage(ids, len(microbatches))
        if ids is None:
            return [None] * len(microbatches)
        return [
            estimated_sequence(mb["tokens"], ids[i], mb["loss_mask"], groups=mb["groups"])
            for i, mb in enumerate(microbatches)
        ]

    def _estimation_forward(self, data_iterator: Iterator[MicroBatch], model, *, step: int):
        mb = next(data_iterator)
        bare = unwrap(model)
        if not bare.post_process:
            return self._run(model, mb), _unused_collect
        # Logits only where an estimate is used (answer positions): prompt and padding rows
        # skip the output layer and the vocab-sized estimator work.
        selection = mb["selection"]
        with selected_output_positions(bare, selection, self.tp_group):
            output = self._run(model, mb)
        return output, partial(self._estimation_collect, mb, selection, step)

    def _estimation_collect(
        self, mb: MicroBatch, sel, step: int, logits: torch.Tensor, non_loss_data: bool = True
    ):
        # logits: [1, n, v/tp] at the selected (answer) positions; only ids and a few device
        # scalars leave this function.
        sample_ids = mb.get("sample_ids")
        if sample_ids is None:
            sample_ids = torch.arange(sel.shape[0], device=logits.device)
        picked_ids = estimate(
            logits, self.cfg, self.vocab_size, step=step,
            sample_ids=sample_ids.to(logits.device)[sel.rows][None], positions=sel.cols[None],
            group=self.tp_group,
        )[0]
        labels = mb["labels"][sel.rows, sel.cols]
        logps = label_logprobs_no_grad(logits[0], labels, self.tp_group)
        mask = mb["loss_mask"]
        ids = sel.scatter(picked_ids, mb["labels"])  # unselected entries are never used
        token_losses = sel.scatter(-logps, torch.zeros(mask.shape, dtype=logps.dtype, device=mask.device))
        sft_sum, sft_count = aggregate(token_losses, mask, mb["groups"], self.cfg.aggregation)
        correct = (picked_ids == labels).sum() * (0 if sel.empty else 1)
        return {
            "ids": ids,
            "sft_sum": sft_sum,
            "sft_count": sft_count,
            "est_correct": correct,
            "est_total": torch.full((), 0 if sel.empty else labels.numel(), device=logits.device),
        }

    def _send_estimates_to_first_stage(self, ids: Optional[torch.Tensor], m: int) -> Optional[torch.Tensor]:
        """Last stage -> first stage (same TP and DP coordinates); other stages get nothing."""
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if pp == 1:
            return ids
        ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        first, last = ranks[0], ranks[-1]
        me = dist.get_rank()
        if me == last:
            dist.send(ids.contiguous(), dst=first)
            return None
        if me == first:
            buf = torch.empty(m, self.micro_batch_size, self.seq_length, dtype=torch.int64, device=self.device)
            dist.recv(buf, src=last)
            return buf
        return None

    # -- pass 2 -------------------------------------------------------------------------------

    def _optimisation_forward(self, data_iterator, model, *, estimates, lam: float):
        mb = next(data_iterator)
        bare = unwrap(model)
        if bare.pre_process and (lam > 0.0 or self.cfg.mixing_embeddings == "detached"):
            xhat = estimates[mb["index"]]
            # One pass of the model's own embedding stage on the mixed word embeddings, handed
            # to GPTModel.forward as its precomputed decoder input.
            with mixed_word_embeddings(
                bare.embedding.word_embeddings,
                xhat if xhat is not None else mb["tokens"],
                lam,
                self.cfg.mixing_embeddings,
            ):
                decoder_input = bare.embedding(input_ids=mb["tokens"], position_ids=mb["position_ids"])
            kwargs = dict(decoder_input=decoder_input)
        else:
            kwargs = {}
        if not bare.post_process:
            return self._run(model, mb, **kwargs), partial(self._optimisation_loss, mb, None)
        # The output layer runs only on trained (answer) positions, fused with the log-probs in
        # chunks of positions: prompt and padding rows skip the vocabulary GEMMs, and no
        # [b, s, v/tp] logits (or their gradient) exist.
        with fused_output_positions(bare, mb["selection"], self.tp_group) as inputs:
            output = self._run(model, mb, **kwargs)  # empty logits [1, 0, v/tp]
        return output, partial(self._optimisation_loss, mb, inputs)

    def _optimisation_loss(self, mb: MicroBatch, inputs, output: torch.Tensor):
        # inputs: the output layer's selected inputs [n, h] and weight [v/tp, h] -> label
        # log-probs [n], placed in [b, s] (zeros at untrained positions, which the loss masks).
        sel = mb["selection"]
        picked = linear_label_logprobs(
            inputs.hidden, inputs.weight, mb["labels"][sel.rows, sel.cols], self.tp_group,
            chunk_size=self.cfg.logprob_chunk_size,
        )
        logps = sel.scatter_grad(picked)
        terms = ift_loss_terms(logps, mb["loss_mask"], self.cfg, mb["groups"])
        # Device scalars: summed on the device and read once per step (IFTStep._reduce).
        report = {
            "loss_sum": terms.loss.detach(),
            "count": terms.count,
            "mixed_sft_sum": terms.mixed_sft,
            "weight_entropy_sum": terms.weight_entropy,
            "num_samples": terms.num_samples,
            "num_tokens": terms.num_tokens,
            "weight_max": terms.weight_max,
        }
        # The loss is already a sum: the schedule must not rescale it (calculate_per_token_loss).
        return terms.loss, terms.count.detach().round().to(torch.int), report

    # -- helpers ------------------------------------------------------------------------------

    def _run(self, model, mb: MicroBatch, **kwargs):
        """One forward of ``model`` on ``mb``: a dense mask for packed rows on the local layer
        spec, THD ``packed_seq_params`` on Transformer Engine, neither for unpacked rows."""
        psp = mb["packed_seq_params"]
        mask = None if psp is not None else attention_mask(mb)
        if psp is not None:
            kwargs["packed_seq_params"] = psp
        return model(mb["tokens"], mb["position_ids"], mask, **kwargs)

    def _iterators(self, microbatches):
        if len(self.chunks) == 1:
            return iter(microbatches)
        return [iter(microbatches) for _ in self.chunks]

    def _validate(self, microbatches) -> None:
        if not microbatches:
            raise ValueError("an IFT step needs at least one micro-batch")
        for i, mb in enumerate(microbatches):
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                if key not in mb:
                    raise ValueError(f"micro-batch {i} has no {key!r}")
            shape = tuple(mb["tokens"].shape)
            if shape != (self.micro_batch_size, self.seq_length):
                raise ValueError(
                    f"micro-batch {i} has shape {shape}, expected "
                    f"({self.micro_batch_size}, {self.seq_length}) (micro_batch_size, seq_length)"
                )
            check_labels(mb["labels"], mb["loss_mask"], self.vocab_size)

    def _reduce(self, sums: torch.Tensor, weight_max: torch.Tensor, lam: float) -> StepOutput:
        """Sum over the pipeline (only the last stage holds values) and data-parallel ranks.

        The one host synchronisation of the step: the device sums are read here, once.
        """
        if dist.is_initialized():
            pp_group = parallel_state.get_pipeline_model_parallel_group()
            dp_group = parallel_state.get_data_parallel_group()
            for g in (pp_group, dp_group):
                dist.all_reduce(sums, group=g)
                dist.all_reduce(weight_max, op=dist.ReduceOp.MAX, group=g)
        *values, weight_max_value = torch.cat([sums, weight_max[None]]).tolist()
        s = dict(zip(_SUM_KEYS, values))
        count = max(s["count"], 1.0)
        metrics = {
            "loss": s["loss_sum"] / count,
            "loss_sft": s["sft_sum"] / max(s["sft_count"], 1.0),
            "loss_mixed_sft": s["mixed_sft_sum"] / count,
            "lambda": lam,
            "estimate_accuracy": s["est_correct"] / s["est_total"] if s["est_total"] else float("nan"),
            "weight_max": weight_max_value,
            "weight_entropy": s["weight_entropy_sum"] / max(s["num_samples"], 1.0),
            "num_samples": s["num_samples"],
            "num_tokens": s["num_tokens"],
            # raw sums, for exact aggregation over several steps (evaluation)
            "loss_sum": s["loss_sum"],
            "count": s["count"],
            "sft_sum": s["sft_sum"],
            "sft_count": s["sft_count"],
        }
        return StepOutput(loss=metrics["loss"], metrics=metrics)
