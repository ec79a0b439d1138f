"""Batched decoding with megatron-core's KV cache, at any tensor/pipeline-parallel layout.

megatron-core 0.16.1's ``StaticInferenceContext`` gives every attention layer a preallocated
key/value cache (``[max_seq, max_batch, groups/tp, head_dim]``); ``GPTModel.forward`` with that
context appends the new keys/values at ``sequence_len_offset``, applies the rotary embedding
of those positions and, after the first call, attends without a causal mask (one query row
per sequence against every cached key). The context shares one offset across the batch, so
prompts of different lengths are handled as megatron-core's own text-generation controller
does: the shortest prompt is encoded in one forward pass, then one token per step is fed to
every row, taken from the row's prompt while it lasts and from the model after that.

Pipeline stages are joined by blocking point-to-point sends of the ``[s, b, h]`` hidden states
(forward only, one micro-batch: no schedule needed). The last stage's TP rank 0 chooses the
tokens (logits gathered over TP by megatron-core, ``runtime_gather_output``) and broadcasts
them to every rank, so all ranks run the same loop and sampling does not depend on the layout.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from tqdm import tqdm

from megatron_ift.inference.sampling import SamplingConfig, next_tokens
from megatron_ift.models.config import ModelConfig
from megatron_ift.platform import Platform
from megatron_ift.validation import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVCacheDecoder:
    """Generate continuations with a loaded model chunk (one per rank).

    Args:
        model: this rank's ``GPTModel`` chunk, in evaluation mode.
        cfg: its model config.
        platform: the compute device.
        progress: a tqdm bar of decoding steps on global rank 0.
    """

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, platform: Platform, *,
                 progress: bool = False) -> None:
        self.model, self.cfg = model, cfg
        self.progress = progress
        # The model, its inputs and every buffer meeting a collective live on this device; the
        # bookkeeping of the decoding loop (rows, lengths, stop checks) stays on the host, which
        # reads the chosen tokens once per generated position anyway (to stop at EOS).
        self.device = platform.device
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.stage = ps.get_pipeline_model_parallel_rank()
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        self.prev = pp_ranks[self.stage - 1] if self.stage > 0 else None
        self.next = pp_ranks[self.stage + 1] if self.stage < self.pp - 1 else None
        self.is_last = self.stage == self.pp - 1
        self.chooser = self.is_last and ps.get_tensor_model_parallel_rank() == 0
        # The chooser's global rank: the world agrees on it through an all-reduce.
        me = torch.tensor([dist.get_rank() if self.chooser else 0], device=self.device)
        dist.all_reduce(me)
        self.src = int(me.item())

    def _forward(self, tokens: torch.Tensor, ctx) -> Optional[torch.Tensor]:
        """One step through every stage: ``[b, s]`` tokens -> ``[b, v]`` next-token logits on
        the last stage (None elsewhere); advances the cache offset."""
        b, s = tokens.shape
        if self.prev is not None:
            hidden = torch.empty(s, b, self.cfg.hidden_size, dtype=_DTYPES[self.cfg.params_dtype],
                                 device=self.device)  # [s, b, h]
            dist.recv(hidden, src=self.prev)
            self.model.set_input_tensor(hidden)
        start = ctx.sequence_len_offset
        positions = torch.arange(start, start + s, device=self.device).expand(b, s)  # [b, s]
        out = self.model(tokens.to(self.device), positions, None, inference_context=ctx,
                         runtime_gather_output=True)
        ctx.sequence_len_offset += s
        if self.next is not None:
            dist.send(out.contiguous(), dst=self.next)  # [s, b, h]
            return None
        return out[:, -1, : self.cfg.vocab_size].float()  # [b, v] (padding columns dropped)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Continue every prompt (collective: every rank calls it with the same arguments).

        Args:
            prompts: token ids, one list per prompt (not empty).
            sampling: greedy or sampling options, ``max_new_tokens``.
            stop_ids: a row ends after producing one of these (it is included in the output).

        Returns:
            The new tokens of each prompt, at most ``max_new_tokens``, and never beyond the
            model's ``max_position_embeddings``.

        Raises:
            ConfigError: an empty prompt, or one with no room left for a new token.
        """
        lengths = [len(p) for p in prompts]
        limit = self.cfg.max_position_embeddings
        if not prompts or min(lengths) < 1 or max(lengths) >= limit:
            raise ConfigError(f"prompt lengths must be in [1, {limit - 1}] tokens (the model's "
                              f"max_position_embeddings - 1), got {lengths}; shorten the prompts")
        total = min(max(lengths) + sampling.max_new_tokens, limit)
        b, first = len(prompts), min(lengths)
        rows = torch.zeros(b, total, dtype=torch.int64)  # [b, total] prompt, then generated
        for i, p in enumerate(prompts):
            rows[i, : len(p)] = torch.tensor(list(p), dtype=torch.int64)
        lengths_t = torch.tensor(lengths)
        budget = torch.clamp(total - lengths_t, max=sampling.max_new_tokens)  # [b]
        produced = torch.zeros(b, dtype=torch.int64)
        done = budget == 0
        stops = torch.tensor(sorted(set(int(t) for t in stop_ids)), dtype=torch.int64)
        generator = torch.Generator().manual_seed(sampling.seed)

        ctx = StaticInferenceContext(b, total)
        bar = tqdm(total=total - first, desc="generate", unit="tok",
                   disable=not (self.progress and dist.get_rank() == 0))
        feed = rows[:, :first]
        for pos in range(first, total):
            logits = self._forward(feed, ctx)
            if pos == first:
                ctx.enable_decode_mode()
            chosen = torch.zeros(b, dtype=torch.int64, device=self.device)
            if self.chooser:  # sampled on the host with the seeded CPU generator
                chosen = next_tokens(logits.cpu(), sampling, generator).to(self.device)
            dist.broadcast(chosen, src=self.src)
            chosen = chosen.cpu()
            in_prompt = pos < lengths_t
            new = ~in_prompt & ~done
            rows[:, pos] = torch.where(in_prompt, rows[:, pos], chosen)
            produced += new.long()
            done |= new & (torch.isin(chosen, stops) | (produced >= budget))
            bar.update(1)
            if bool(done.all()):
                break
            feed = rows[:, pos: pos + 1]
        bar.close()
        return [rows[i, lengths[i]: lengths[i] + int(produced[i])].tolist() for i in range(b)]
