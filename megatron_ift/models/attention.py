"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` (no Transformer Engine).

megatron-core's local ``DotProductAttention`` materialises the ``[b, np, s, s]`` scores, applies
an explicit mask, a separate softmax and dropout, then a second batched GEMM; it also repeats
the key/value heads for grouped-query attention. :class:`SDPAttention` is a drop-in
``core_attention`` submodule (same constructor and ``forward`` signature as megatron-core
0.16.1's ``DotProductAttention``) that hands the whole computation to PyTorch's fused kernel
(flash attention on CPU and CUDA, memory-efficient attention otherwise):

* unpacked rows (``attention_mask is None``, causal mask type): ``is_causal=True``, no mask
  tensor at all;
* packed rows: megatron's ``[b, 1, s, s]`` boolean mask (True = masked, causality included, see
  :func:`megatron_ift.data.packing.packed_attention_mask`) is passed as SDPA's ``attn_mask``
  (True = attend). On this CPU the fused kernel with a block mask is as fast as the causal one
  and exact; a per-segment varlen loop or flex attention would only add Python work here;
* grouped-query attention via ``enable_gqa`` (no repeated key/value copies; on CUDA with a
  mask the copies are made, so the memory-efficient kernel runs: :func:`grouped_key_values`);
* attention dropout via ``dropout_p`` in training mode, under megatron-core's model-parallel RNG
  tracker like the local module (different random stream, same distribution).

Context parallelism (the all-gather scheme, exact): every rank's queries attend to the keys
and values of the whole row, all-gathered over the context-parallel group (their gradients
reduce-scattered back) and put in sequence order. Rows that are not packed need no mask tensor:
each of the rank's two chunks of the load-balanced layout (global chunk ``g`` of ``c`` tokens)
attends to the first ``(g + 1) c`` keys with a lower-right aligned causal mask
(``torch.nn.attention.bias.causal_lower_right`` on CUDA, which the fused kernels take without a
mask tensor; elsewhere one cached additive mask per shape, :func:`lower_right_causal_mask`). Packed rows come
with the block mask of their global positions, ``[b, 1, s/cp, s]``
(:meth:`megatron_ift.training.microbatch.MicroBatch.attention_mask`).

Select it with ``model.attention_backend`` (``auto``: this module whenever the Transformer
Engine spec is not used).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch.nn.attention.bias import causal_lower_right
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from megatron_ift.ift.context_parallel import gather_seq_first, gathered_order


def grouped_key_values(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, cuda: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Keys and values for ``F.scaled_dot_product_attention`` with grouped-query attention, and
    its ``enable_gqa`` flag.

    Without a mask, or off CUDA, the groups go in as they are (``enable_gqa``: no copies). On
    CUDA with a mask (packed rows' block mask, a lower-right causal bias), flash attention takes
    no mask and memory-efficient attention no ``enable_gqa``, so torch would fall back to the
    math kernel with ``[b, heads, s, s]`` fp32 scores (review finding 8): there the keys and
    values are repeated to one per head, which the memory-efficient kernel takes with the mask.
    ``q [b, heads, s, d]``, ``k, v [b, groups, s, d]``.
    """
    heads, groups = q.shape[1], k.shape[1]
    if heads == groups:
        return k, v, False
    if not cuda or mask is None:
        return k, v, True
    return k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1), False


@functools.lru_cache(maxsize=16)
def lower_right_causal_mask(sq: int, sk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[sq, sk]`` additive mask (0 / -inf, ``dtype``): query ``i`` sees keys ``<= sk - sq + i``.

    For kernels that cannot take ``causal_lower_right`` without materialising it (the CPU
    kernels make a new mask per call, which autograd keeps per layer): one cached tensor per
    shape, which every layer's kernel keeps by reference.
    """
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
    return torch.zeros(sq, sk, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


class SDPAttention(MegatronModule):
    """Fused scaled-dot-product core attention for megatron-core's local layer spec.

    Args (as megatron-core's ``DotProductAttention``):
        config: the transformer config.
        layer_number: 1-based layer index (only checked for window attention).
        attn_mask_type: ``causal`` (decoder self-attention) or ``padding`` / ``no_mask``.
        attention_type: ``self`` or ``cross`` (unused, as in megatron-core).
        attention_dropout: dropout probability (default: ``config.attention_dropout``).
        softmax_scale: scale of the scores (default: ``1 / sqrt(head_dim)``).
        cp_comm_type: context-parallel communication: ``all_gather`` (the only scheme here) or
            None.
        pg_collection: process groups; needs ``tp`` (and ``cp`` with context parallelism).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if cp_comm_type not in (None, "all_gather"):
            raise ValueError(f"SDPAttention's context parallelism all-gathers keys and values; "
                             f"cp_comm_type={cp_comm_type!r} is not supported")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("model.attention_backend=sdpa does not support sliding-window attention")
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"model.attention_backend=sdpa supports only the vanilla softmax, not "
                f"{config.softmax_type!r}"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_size = config.context_parallel_size
        self.cp_rank = self.cp_group.rank() if self.cp_size > 1 else 0
        world = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels
        self.num_heads = divide(config.num_attention_heads, world)
        self.num_groups = divide(config.num_query_groups, world)
        self.hidden_size_per_partition = self.num_heads * head_dim
        # apply_query_key_layer_scaling divides the scale by the layer number and multiplies the
        # scores back in the softmax (an fp16 range trick): the net scale is the plain one.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """Attention context of this rank's heads.

        Args:
            query: ``[sq, b, np/tp, hn]``.
            key, value: ``[sk, b, ng/tp, hn]``.
            attention_mask: None (causal from ``attn_mask_type``) or megatron's boolean
                ``[b or 1, 1, sq, sk]`` mask, True where attention is not allowed.
            attn_mask_type: overrides the module's mask type for this call.
            attention_bias, packed_seq_params: not supported (as in ``DotProductAttention``).

        Returns:
            context ``[sq, b, np/tp * hn]``.
        """
        if packed_seq_params is not None:
            raise ValueError(
                "SDPAttention takes packed rows as a block mask (attention_mask), not "
                "packed_seq_params (THD layout is Transformer Engine's)"
            )
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        mask_type = attn_mask_type or self.attn_mask_type
        if self.cp_size > 1:
            key, value = self._gather_sequence(key, value)  # [s, b, ng/tp, hn] each
        sq, sk = query.shape[0], key.shape[0]
        # [s, b, n, hn] -> [b, n, s, hn]; SDPA accepts the strided views.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        is_causal = False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
        elif self.cp_size > 1:
            context = self._causal_chunks(q, k, v)
            return context.permute(2, 0, 1, 3).reshape(sq, q.shape[0], self.hidden_size_per_partition)
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError("a causal mask without a mask tensor needs sq == sk")
            is_causal = True
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Heads differ across TP ranks: draw their dropout from the model-parallel stream,
            # as megatron-core's DotProductAttention does.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self._sdpa(q, k, v, mask, is_causal, dropout_p)
        else:
            context = self._sdpa(q, k, v, mask, is_causal, dropout_p)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, q.shape[0], self.hidden_size_per_partition)

    def _gather_sequence(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[s/cp, b, ...]`` on every context-parallel rank -> ``[s, b, ...]`` in sequence order
        (one index tensor for all of them: autograd keeps it for the backward)."""
        gathered = [gather_seq_first(t, self.cp_group) for t in tensors]  # rank order
        order = gathered_order(gathered[0].shape[0], self.cp_size, gathered[0].device)
        return tuple(t.index_select(0, order) for t in gathered)

    def _causal_chunks(self, q, k, v) -> torch.Tensor:
        """Unpacked rows under context parallelism: each local chunk against the keys up to its
        end, lower-right causal. ``q [b, np, s/cp, hn]``, ``k, v [b, ng, s, hn]`` (sequence
        order) -> ``[b, np, s/cp, hn]``."""
        c = q.shape[2] // 2
        dropout_p = self.dropout_p if self.training else 0.0
        out = []
        for j, g in enumerate((self.cp_rank, 2 * self.cp_size - 1 - self.cp_rank)):
            end = (g + 1) * c
            mask, is_causal = None, g == 0  # the first chunk: square, plain causal
            if g:
                mask = (causal_lower_right(c, end) if q.device.type == "cuda"
                        else lower_right_causal_mask(c, end, q.dtype, q.device))
            qc = q[:, :, j * c:(j + 1) * c]
            if dropout_p > 0.0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out.append(self._sdpa(qc, k[:, :, :end], v[:, :, :end], mask, is_causal, dropout_p))
            else:
                out.append(self._sdpa(qc, k[:, :, :end], v[:, :, :end], mask, is_causal, dropout_p))
        return torch.cat(out, dim=2)

    def _sdpa(self, q, k, v, mask, is_causal: bool, dropout_p: float) -> torch.Tensor:
        k, v, enable_gqa = grouped_key_values(q, k, v, mask, cuda=q.is_cuda)
        return F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=enable_gqa,
        )
