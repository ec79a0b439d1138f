"""``DotProductAttention`` (TE's core attention), on ``F.scaled_dot_product_attention``.

Inputs per ``qkv_format``: ``sbhd`` ``[s, b, h, d]`` -> output ``[s, b, h * d]``; ``bshd``
``[b, s, h, d]`` -> ``[b, s, h * d]``; ``thd`` ``[t, h, d]`` with ``cu_seqlens_q/kv`` (int32, on
the inputs' device, first 0, last ``t``) and ``max_seqlen_q/kv`` -> ``[t, h * d]``. Masks:
``no_mask``, ``causal``, ``causal_bottom_right``, ``padding``, ``padding_causal``,
``padding_causal_bottom_right`` and ``arbitrary`` (``attention_mask`` True = masked); ``thd``
takes the padding kinds (sequences never attend to each other). Grouped-query attention
(``num_gqa_groups``), ``softmax_scale``, attention dropout under the given RNG tracker's
``model-parallel-rng`` stream. Context parallelism (``cp_group`` of size > 1, sbhd / bshd, causal):
megatron-core's load-balanced layout (rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r``), keys and
values all-gathered over the CP group and put in sequence order, each chunk attending up to its
end; ``p2p`` and ``all_gather`` give the same result (they differ in TE's communication
schedule, which is not modelled); ``a2a`` is not covered. ``thd`` with CP (``p2p`` only, as in TE):
each rank holds chunks ``r`` and ``2 cp - 1 - r`` of every packed sequence, ``cu_seqlens`` (and
``cu_seqlens_*_padded``) describe the whole sequences, every padded length a multiple of ``2 cp``
(asserted on the device); keys and values all-gathered and reordered by the global positions.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from transformer_engine.pytorch.attention.rope import thd_positions

_PADDING_KINDS = ("padding", "padding_causal", "padding_causal_bottom_right")
_MASKS = ("no_mask", "causal", "causal_bottom_right", "arbitrary") + _PADDING_KINDS


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        out = torch.empty((grad.shape[0] // n,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def _cp_positions(s: int, rank: int, cp: int, device) -> torch.Tensor:
    c = s // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)])


class DotProductAttention(torch.nn.Module):
    """``transformer_engine.pytorch.DotProductAttention``."""

    def __init__(self, num_attention_heads: int, kv_channels, num_gqa_groups: Optional[int] = None,
                 attention_dropout: float = 0.0, qkv_format: str = "sbhd", attn_mask_type: str = "causal",
                 window_size=None, sequence_parallel: bool = False, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, tp_group=None, layer_number=None,
                 attention_type: str = "self", cp_group=None, cp_global_ranks=None, cp_stream=None,
                 cp_comm_type: str = "p2p", softmax_scale: Optional[float] = None,
                 softmax_type: str = "vanilla", return_max_logit: bool = False, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        if window_size not in (None, (-1, -1), (-1, 0)):
            raise NotImplementedError("the Transformer Engine stand-in does not cover sliding windows")
        if softmax_type != "vanilla" or return_max_logit:
            raise NotImplementedError("the Transformer Engine stand-in covers vanilla softmax only")
        if attn_mask_type not in _MASKS:
            raise ValueError(f"attn_mask_type={attn_mask_type!r}")
        self.tp_size = tp_size if tp_group is None else dist.get_world_size(tp_group)
        self.num_heads = num_attention_heads // self.tp_size
        groups = num_gqa_groups or num_attention_heads
        if num_attention_heads % groups:
            raise ValueError("num_gqa_groups must divide num_attention_heads")
        self.num_groups = groups // self.tp_size
        if isinstance(kv_channels, tuple):
            if kv_channels[0] != kv_channels[1]:
                raise NotImplementedError("different k and v head sizes are not covered")
            kv_channels = kv_channels[0]
        self.head_dim = kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(kv_channels)
        self.dropout_p = attention_dropout
        self.qkv_format, self.attn_mask_type = qkv_format, attn_mask_type
        self.get_rng_state_tracker = get_rng_state_tracker
        self.layer_number, self.attention_type = layer_number, attention_type
        self.set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type)

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type: str = "p2p") -> None:
        self.cp_group, self.cp_global_ranks, self.cp_stream = cp_group, cp_global_ranks, cp_stream
        self.cp_comm_type = cp_comm_type
        self.cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
        if self.cp_size > 1 and cp_comm_type not in ("p2p", "all_gather"):
            raise NotImplementedError(f"cp_comm_type={cp_comm_type!r} is not covered by the stand-in")

    # -- forward -------------------------------------------------------------------------------

    def forward(self, query_layer: torch.Tensor, key_layer: torch.Tensor, value_layer: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, qkv_format: Optional[str] = None,
                cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_kv: Optional[torch.Tensor] = None,
                cu_seqlens_q_padded: Optional[torch.Tensor] = None,
                cu_seqlens_kv_padded: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                max_seqlen_kv: Optional[int] = None, attn_mask_type: Optional[str] = None,
                window_size=None, checkpoint_core_attention: bool = False,
                core_attention_bias_type: str = "no_bias", core_attention_bias=None,
                alibi_slopes=None, fast_zero_fill: bool = True, inference_params=None,
                pad_between_seqs: Optional[bool] = None, qkv_layout: Optional[str] = None,
                **kwargs) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        if core_attention_bias_type != "no_bias" or alibi_slopes is not None or inference_params is not None:
            raise NotImplementedError("attention bias, ALiBi and inference caches are not covered")
        fmt = qkv_format or self.qkv_format
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = query_layer, key_layer, value_layer
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"queries, keys and values must share a dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
        if not (q.device == k.device == v.device):
            raise ValueError("queries, keys and values must be on one device")
        if q.shape[-2] != self.num_heads or k.shape[-2] != self.num_groups or q.shape[-1] != self.head_dim:
            raise ValueError(f"shapes {tuple(q.shape)} / {tuple(k.shape)} do not match {self.num_heads} heads, "
                             f"{self.num_groups} groups of {self.head_dim} per rank")
        if fmt == "thd":
            return self._thd(q, k, v, mask_type, cu_seqlens_q, cu_seqlens_kv, cu_seqlens_q_padded,
                             cu_seqlens_kv_padded, max_seqlen_q, max_seqlen_kv)
        if fmt not in ("sbhd", "bshd"):
            raise ValueError(f"qkv_format={fmt!r}: sbhd, bshd or thd")
        if mask_type in _PADDING_KINDS:
            raise NotImplementedError("padding masks on sbhd / bshd are not covered (use thd)")
        if fmt == "sbhd":  # -> [b, h, s, d]
            qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        else:
            qb, kb, vb = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        if self.cp_size > 1:
            out = self._context_parallel(qb, kb, vb, mask_type)
        else:
            mask, causal = None, False
            if mask_type == "arbitrary":
                if attention_mask is None:
                    raise ValueError("attn_mask_type='arbitrary' needs attention_mask")
                mask = ~attention_mask
            elif mask_type == "causal":
                causal = True
            elif mask_type == "causal_bottom_right":
                sq, sk = qb.shape[2], kb.shape[2]
                mask = torch.ones(sq, sk, dtype=torch.bool, device=qb.device).tril(sk - sq)
            out = self._sdpa(qb, kb, vb, mask, causal)
        b, h, s, d = out.shape
        if fmt == "sbhd":
            return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
        return out.permute(0, 2, 1, 3).reshape(b, s, h * d)

    def _sdpa(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                      enable_gqa=self.num_heads != self.num_groups)
        if dropout > 0.0 and self.get_rng_state_tracker is not None:
            with self.get_rng_state_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **kwargs)

    def _context_parallel(self, q, k, v, mask_type: str) -> torch.Tensor:
        if mask_type not in ("causal", "no_mask"):
            raise NotImplementedError(f"context parallelism with attn_mask_type={mask_type!r} is not covered")
        cp, rank = self.cp_size, dist.get_rank(self.cp_group)
        s_local = q.shape[2]
        if s_local % 2:
            raise ValueError("context parallelism needs an even number of tokens per rank")
        # [b, g, s/cp, d] -> gathered in rank order along the sequence, then sequence order.
        kk, vv = (_GatherSeq.apply(t.permute(2, 0, 1, 3), self.cp_group) for t in (k, v))
        every = torch.cat([_cp_positions(s_local * cp, r, cp, q.device) for r in range(cp)])
        order = torch.argsort(every)
        kk, vv = (t.index_select(0, order).permute(1, 2, 0, 3) for t in (kk, vv))
        if mask_type == "no_mask":
            return self._sdpa(q, kk, vv, None, False)
        c = s_local // 2
        out = []
        for j, g in enumerate((rank, 2 * cp - 1 - rank)):
            end = (g + 1) * c
            mask = torch.ones(c, end, dtype=torch.bool, device=q.device).tril(end - c)
            out.append(self._sdpa(q[:, :, j * c:(j + 1) * c], kk[:, :, :end], vv[:, :, :end], mask, False))
        return torch.cat(out, dim=2)

    def _thd(self, q, k, v, mask_type, cu_q, cu_kv, cu_q_padded, cu_kv_padded, max_q, max_kv):
        """THD: tokens of packed sequences laid out by ``cu_seqlens_*_padded`` (default: the
        unpadded offsets), the first ``cu[i + 1] - cu[i]`` tokens of sequence ``i`` real (padding
        attends nowhere and its output is 0). With context parallelism (``p2p``, the only THD
        mode TE has) ``q/k/v`` hold this rank's share of every sequence (chunks ``r`` and
        ``2 cp - 1 - r`` of ``2 cp``) and the offsets describe the whole sequences: keys and values
        are all-gathered over the CP group and put in global token order."""
        if mask_type not in _PADDING_KINDS + ("causal", "no_mask"):
            raise ValueError(f"qkv_format='thd' with attn_mask_type={mask_type!r}")
        named = (("cu_seqlens_q", cu_q), ("cu_seqlens_kv", cu_kv), ("cu_seqlens_q_padded", cu_q_padded),
                 ("cu_seqlens_kv_padded", cu_kv_padded))
        for name, cu in named:
            if cu is None:
                if name.endswith("_padded"):
                    continue
                raise ValueError(f"qkv_format='thd' needs {name}")
            if cu.dtype != torch.int32:
                raise TypeError(f"{name} must be int32 (got {cu.dtype}), as TE's kernels take it")
            if cu.device != q.device:
                raise ValueError(f"{name} must be on the inputs' device {q.device} (got {cu.device})")
            if cu.dim() != 1:
                raise ValueError(f"{name} must be 1-D")
        if max_q is None or max_kv is None:
            raise ValueError("qkv_format='thd' needs max_seqlen_q and max_seqlen_kv")
        if q.shape[0] != k.shape[0]:
            raise NotImplementedError("THD with different query and key token counts is not covered")
        pad_q = cu_q if cu_q_padded is None else cu_q_padded
        pad_kv = cu_kv if cu_kv_padded is None else cu_kv_padded
        t = q.shape[0]
        cp = self.cp_size
        if cp > 1:
            if self.cp_comm_type != "p2p":
                # TE's all_gather and a2a context parallelism assert qkv_format != "thd".
                raise AssertionError(f"thd format is not supported with cp_comm_type={self.cp_comm_type!r} "
                                     "(Transformer Engine's THD context parallelism is p2p)")
            if t % 2:
                raise AssertionError("Sequence length per GPU needs to be divisible by 2!")
            for name, cu in (("cu_seqlens_q_padded", pad_q), ("cu_seqlens_kv_padded", pad_kv)):
                # Every (padded) sequence is split into 2 x cp chunks; checked on the device.
                torch._assert_async(((cu[1:] - cu[:-1]) % (2 * cp) == 0).all(),
                                    f"{name}: every padded sequence length must be a multiple of "
                                    f"2 x cp_size = {2 * cp} for THD context parallelism")
            rank = dist.get_rank(self.cp_group)
            seq_q, pos_q = thd_positions(pad_q, t, cp, rank)
            k, v = (_GatherSeq.apply(x, self.cp_group) for x in (k, v))  # [cp * t, g, d], rank order
            every = []
            for r in range(cp):
                seq_r, pos_r = thd_positions(pad_kv, t, cp, r)
                every.append(pad_kv.to(torch.int64)[seq_r] + pos_r)
            order = torch.argsort(torch.cat(every))
            k, v = (x.index_select(0, order) for x in (k, v))  # global token order
            seq_k, pos_k = thd_positions(pad_kv, cp * t)
        else:
            seq_q, pos_q = thd_positions(pad_q, t)
            seq_k, pos_k = thd_positions(pad_kv, t)
        # Block-diagonal (causal) mask of real tokens, built on the device.
        real_q = pos_q < (cu_q[1:] - cu_q[:-1]).to(torch.int64)[seq_q]
        real_k = pos_k < (cu_kv[1:] - cu_kv[:-1]).to(torch.int64)[seq_k]
        allowed = (seq_q[:, None] == seq_k[None, :]) & real_k[None, :]
        if "causal" in mask_type:
            allowed = allowed & (pos_k[None, :] <= pos_q[:, None])
        allowed = allowed | ~real_q[:, None]  # padding queries: any row (output zeroed below)
        qb, kb, vb = (x.permute(1, 0, 2)[None] for x in (q, k, v))  # [1, h, t, d]
        out = self._sdpa(qb, kb, vb, allowed, False)  # [1, h, t, d]
        out = out * real_q[None, None, :, None].to(out.dtype)
        return out[0].permute(1, 0, 2).reshape(t, self.num_heads * self.head_dim)
