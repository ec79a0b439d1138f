"""The two-pass IFT step on megatron-core's pipeline schedules (1F1B and interleaved).

Pass 1 (estimation, skipped when lambda = 0): forward-only over every micro-batch of the step,
under ``no_grad`` with dropout off; the last pipeline stage turns the vocab-parallel logits of
the trained positions into estimated token ids (nothing else is kept) and sends them to the
first stage.

Pass 2 (optimisation): the normal schedule; the first stage mixes the word embeddings
``(1 - lambda) * E[x] + lambda * E[xhat]`` of the model's own table and runs the model on them;
the last stage gets the final hidden states of the trained positions and computes the IFT loss
from vocab-parallel label log-probs, the output layer fused in, in chunks of
``ift.logprob_chunk_size`` positions (:func:`megatron_ift.ift.linear_label_logprobs`). The loss
function returns ``(sum, count, sums)`` and the schedule runs with ``calculate_per_token_loss``,
so ``finalize_model_grads`` divides the gradients by the count summed over micro-batches and
data-parallel ranks: the step optimises ``total_sum / total_count`` of the *global* batch,
independent of how samples are split (per-sample or per-token mean, ``IFTConfig.aggregation``).

The model is called through :class:`megatron_ift.models.ift_model.IFTGPTModel`'s explicit entry
points (no hooks); every metric is a device tensor until one reduction per step
(:mod:`megatron_ift.training.step_metrics`).

Context parallelism: each rank runs the model on its two chunks of every row; the estimates and
the label log-probs of the whole rows are gathered over the context-parallel group, so the
estimated sequence, the propagation weights and the loss are computed on whole rows exactly as
without it; context-parallel rank 0 reports the loss and its count
(:mod:`megatron_ift.ift.context_parallel`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ift.checkpoint.model_io import unwrap
from megatron_ift.data.batch import Batch
from megatron_ift.ift.context_parallel import first_rank_only, gather_sequence
from megatron_ift.ift import (
    IFTConfig,
    aggregate,
    check_labels,
    estimate,
    estimated_sequence,
    ift_loss_terms,
    label_logprobs_no_grad,
    lambda_at,
    linear_label_logprobs,
    mix_embeddings,
)
from megatron_ift.models.ift_model import IFTGPTModel
from megatron_ift.platform import Platform
from megatron_ift.training.frozen_embedding import check_input_embedding
from megatron_ift.training.microbatch import MicroBatch
from megatron_ift.training.step_metrics import StepMetrics, StepSums


def _unused(output: torch.Tensor, non_loss_data: bool = True) -> None:
    """Non-last pipeline stages: the schedule never calls this (their output is sent on)."""
    return None


class IFTStep:
    """Runs one IFT (or SFT) step over a list of micro-batches on this rank's model chunks.

    Args:
        chunks: this rank's model chunks (megatron DDP-wrapped or bare
            :class:`~megatron_ift.models.ift_model.IFTGPTModel`), in virtual pipeline order.
        cfg: the IFT options.
        vocab_size: the true vocabulary size (padded entries are never estimated).
        seq_length, micro_batch_size: shapes of every micro-batch (pipeline p2p buffers).
        platform: the compute device and its host-sync discipline.
        thd: packed rows reach attention as Transformer Engine THD sequences
            (``packed_seq_params``) rather than a dense mask (the TE layer spec).
        progress: called with the name of each part of the step as it starts (the watchdog,
            :mod:`megatron_ift.training.watchdog`).

    Device discipline: micro-batches arrive on the host and are moved to the compute device
    once, with their data-dependent metadata computed on the host first
    (:meth:`MicroBatch.prepare`); every metric stays a device tensor until one reduction per
    step, so the micro-batch loops never wait for the device.
    """

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        cfg: IFTConfig,
        vocab_size: int,
        *,
        seq_length: int,
        micro_batch_size: int,
        platform: Platform,
        thd: bool = False,
        progress: Callable[[str], None] = lambda part: None,
    ) -> None:
        self.chunks = list(chunks)
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.platform = platform
        self.thd = thd
        self.progress = progress
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp_size = parallel_state.get_context_parallel_world_size()
        config = unwrap(self.chunks[0]).config
        if not config.calculate_per_token_loss:
            # The loss function returns (sum, count): the schedule must not divide it.
            raise ValueError("IFTStep needs a model built by training.engine.build_model "
                             "(its TransformerConfig sets calculate_per_token_loss)")
        if not all(isinstance(unwrap(c), IFTGPTModel) for c in self.chunks):
            raise ValueError("IFTStep needs IFTGPTModel chunks (models.gpt.build_gpt_chunks)")
        check_input_embedding(self.chunks, cfg.mixing_embeddings)

    def __call__(self, batches: Sequence[Batch], step: int, *, forward_only: bool = False) -> StepMetrics:
        """Estimation pass (if lambda > 0) then the optimisation pass over ``batches``.

        Gradients are accumulated into the chunks (megatron DDP ``main_grad``); the caller zeroes
        them before and runs the optimizer after. ``forward_only`` evaluates without gradients.
        """
        self._validate(batches)  # on the host, before anything reaches the device
        lam = lambda_at(self.cfg, step)
        microbatches = [MicroBatch.prepare(b, i, self.platform.device, thd=self.thd,
                                           cp_rank=self.cp_rank, cp_size=self.cp_size)
                        for i, b in enumerate(batches)]
        sums = StepSums()
        estimates: list[Optional[torch.Tensor]] = [None] * len(microbatches)
        if lam > 0.0:
            self.progress("estimation pass")
            estimates = self._estimation_pass(microbatches, step, sums)
        self.progress("forward-only pass" if forward_only else "optimisation pass (forward and backward)")
        with self.platform.no_host_sync("the optimisation pass's micro-batch loop"):
            reports = get_forward_backward_func()(
                forward_step_func=partial(self._optimisation_forward, estimates=estimates, lam=lam),
                data_iterator=self._iterators(microbatches),
                model=self.chunks,
                num_microbatches=len(microbatches),
                seq_length=self.seq_length,
                micro_batch_size=self.micro_batch_size,
                forward_only=forward_only,
            )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            optimisation = StepSums()
            for report in reports:
                optimisation += report
            sums += optimisation
            if lam == 0.0:  # the optimisation pass *is* the ground-truth pass
                sums.sft_sum, sums.sft_count = optimisation.mixed_sft_sum, optimisation.count
        groups = (parallel_state.get_pipeline_model_parallel_group(),
                  parallel_state.get_data_parallel_group(with_context_parallel=True)
                  ) if dist.is_initialized() else ()
        self.progress("metric reduction")
        return sums.reduce(groups, self.platform.device, lam)

    # -- pass 1 -------------------------------------------------------------------------------

    def _estimation_pass(self, microbatches: list[MicroBatch], step: int,
                         sums: StepSums) -> list[Optional[torch.Tensor]]:
        """Estimated sequences ``xhat [b, s]`` per micro-batch on the first stage (None elsewhere)."""
        modes = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()  # dropout off
        try:
            with torch.no_grad(), self.platform.no_host_sync("the estimation pass's micro-batch loop"):
                outputs = get_forward_backward_func()(
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
            ids = torch.stack([ids_ for ids_, _ in outputs])  # [m, b, s]
            for _, report in outputs:
                sums += report
        ids = self._send_estimates_to_first_stage(ids, len(microbatches))
        if ids is None:
            return [None] * len(microbatches)
        out = []
        for i, mb in enumerate(microbatches):
            rows = mb.rows
            estimates = gather_sequence(ids[i], self.cp_group, mb.gather_order)  # [b, s]: every rank's chunks
            xhat = estimated_sequence(rows.tokens, estimates, rows.loss_mask, groups=mb.groups)
            out.append(xhat[:, mb.positions])  # this rank's tokens
        return out

    def _estimation_forward(self, data_iterator: Iterator[MicroBatch], model, *, step: int):
        mb = next(data_iterator)
        bare = unwrap(model)
        hidden = self._hidden_states(bare, mb)  # last stage: [n, h] at the trained positions
        if not bare.post_process:
            return hidden, _unused
        return hidden, partial(self._estimate, bare, mb, step)

    def _estimate(self, model: IFTGPTModel, mb: MicroBatch, step: int, hidden: torch.Tensor,
                  non_loss_data: bool = True) -> tuple[torch.Tensor, StepSums]:
        """Estimated ids ``[b, s]`` (meaningful at the trained positions only) and the
        estimation pass's metrics. Only the ids and a few device scalars leave."""
        sel = mb.selection
        logits = model.output_logits(hidden)[None]  # [1, n, v/tp]
        picked = estimate(  # the noise is keyed on positions in the whole row
            logits, self.cfg, self.vocab_size, step=step,
            sample_ids=mb.sample_ids[sel.rows][None], positions=mb.positions[sel.cols][None],
            group=self.tp_group,
        )[0]  # [n]
        labels = mb.labels[sel.rows, sel.cols]
        logps = label_logprobs_no_grad(logits[0], labels, self.tp_group)
        token_losses = sel.scatter(-logps, torch.zeros_like(mb.loss_mask, dtype=logps.dtype))
        token_losses = gather_sequence(token_losses, self.cp_group, mb.gather_order)  # [b, s]
        sft_sum, sft_count = aggregate(token_losses, mb.rows.loss_mask, mb.groups, self.cfg.aggregation)
        trained = 0 if sel.empty else 1
        report = StepSums(
            sft_sum=first_rank_only(sft_sum, self.cp_group),
            sft_count=first_rank_only(sft_count, self.cp_group),
            est_correct=(picked == labels).sum() * trained,
            est_total=torch.full((), trained * labels.numel(), device=logits.device),
        )
        return sel.scatter(picked, mb.labels), report

    def _send_estimates_to_first_stage(self, ids: Optional[torch.Tensor], m: int) -> Optional[torch.Tensor]:
        """Last stage -> first stage (same TP and DP coordinates); other stages get nothing."""
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return ids
        ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        first, last = ranks[0], ranks[-1]
        me = dist.get_rank()
        if me == last:
            dist.send(ids.contiguous(), dst=first)
            return None
        if me == first:
            buf = torch.empty(m, self.micro_batch_size, self.seq_length // self.cp_size,
                              dtype=torch.int64, device=self.platform.device)
            dist.recv(buf, src=last)
            return buf
        return None

    # -- pass 2 -------------------------------------------------------------------------------

    def _optimisation_forward(self, data_iterator: Iterator[MicroBatch], model, *,
                              estimates: list[Optional[torch.Tensor]], lam: float):
        mb = next(data_iterator)
        bare = unwrap(model)
        words = None
        if bare.pre_process and (lam > 0.0 or self.cfg.mixing_embeddings == "detached"):
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.mixing_embeddings == "live"):
                xhat = estimates[mb.index]
                words = mix_embeddings(
                    bare.embed_tokens(mb.tokens),
                    bare.embed_tokens(xhat) if lam > 0.0 else None,
                    lam, self.cfg.mixing_embeddings,
                )
        hidden = self._hidden_states(bare, mb, word_embeddings=words)
        if not bare.post_process:
            return hidden, _unused
        return hidden, partial(self._loss, bare, mb)

    def _loss(self, model: IFTGPTModel, mb: MicroBatch, hidden: torch.Tensor):
        """The IFT loss of one micro-batch from the hidden states of its trained positions
        ``[n, h]``: ``(loss sum, count, sums)`` (the schedule must not rescale the sum:
        ``calculate_per_token_loss``)."""
        sel = mb.selection
        picked = linear_label_logprobs(
            hidden, model.output_weight(), mb.labels[sel.rows, sel.cols], self.tp_group,
            chunk_size=self.cfg.logprob_chunk_size,
        )  # [n]
        logps = sel.scatter_grad(picked)  # [b, s/cp], zero at untrained positions (masked)
        logps = gather_sequence(logps, self.cp_group, mb.gather_order)  # [b, s]: the whole rows
        terms = ift_loss_terms(logps, mb.rows.loss_mask, self.cfg, mb.groups)
        # One context-parallel rank reports the whole rows' loss; every rank's backward returns
        # the gradient of its own log-probs through the gather.
        loss = first_rank_only(terms.loss, self.cp_group)
        count = first_rank_only(terms.count, self.cp_group)
        report = StepSums(
            loss_sum=loss.detach(), count=count, weight_max=terms.weight_max,
            **{k: first_rank_only(v, self.cp_group) for k, v in dict(
                mixed_sft_sum=terms.mixed_sft, weight_entropy_sum=terms.weight_entropy,
                num_samples=terms.num_samples, num_tokens=terms.num_tokens).items()},
        )
        return loss, count.detach().round().to(torch.int), report

    # -- helpers ------------------------------------------------------------------------------

    def _hidden_states(self, model: IFTGPTModel, mb: MicroBatch,
                       word_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        return model.hidden_states(
            mb.tokens, mb.position_ids, mb.attention_mask(),
            positions=mb.output_positions, word_embeddings=word_embeddings,
            packed_seq_params=mb.packed_seq_params,
        )

    def _iterators(self, microbatches: list[MicroBatch]):
        if len(self.chunks) == 1:
            return iter(microbatches)
        return [iter(microbatches) for _ in self.chunks]

    def _validate(self, batches: Sequence[Batch]) -> None:
        if not batches:
            raise ValueError("an IFT step needs at least one micro-batch")
        for i, batch in enumerate(batches):
            if batch.shape != (self.micro_batch_size, self.seq_length):
                raise ValueError(
                    f"micro-batch {i} has shape {batch.shape}, expected "
                    f"({self.micro_batch_size}, {self.seq_length}) (micro_batch_size, seq_length)"
                )
            check_labels(batch.labels, batch.loss_mask, self.vocab_size)
