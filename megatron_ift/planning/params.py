"""Exact per-rank memory of parameters, gradients and optimizer state under megatron-core.

Three steps, each mirroring the megatron-core 0.16 code it stands for:

1. :func:`chunk_parameters` lists one model chunk's parameters in ``named_parameters()`` order
   with their tensor-parallel shapes (``GPTModel`` with the local layer spec; the Transformer
   Engine spec holds the same tensors, its norm weights fused into the following linear layer).
2. :func:`buffer_layout` places them in the contiguous buffer that megatron DDP allocates for
   parameters and gradients (``_ParamAndGradBuffer``): reverse order, each parameter's start
   padded to 64 elements and each bucket's end to ``lcm(dp, 128)`` under the distributed
   optimizer, so that every bucket splits evenly over data-parallel ranks.
3. :func:`state_memory` turns that layout into bytes for one data-parallel rank: the bf16
   parameter buffer and the gradient buffer are whole on every rank; the fp32 master weights and
   both Adam moments exist only for the rank's shard of each bucket (the distributed optimizer).

tests/distributed/test_plan_memory.py checks the results byte for byte against real megatron-core models and
optimizers built on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ift.models.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of a model chunk, as megatron-core names and shapes it on a rank."""

    name: str
    shape: tuple[int, ...]
    shared_embedding: bool = False
    """Tied embedding/output weight on a pipeline end stage: DDP gives it a bucket of its own."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def chunk_layers(num_layers: int, pp: int, vpp: int) -> int:
    """Transformer layers per model chunk (megatron-core splits them evenly)."""
    return num_layers // (pp * vpp)


def chunk_parameters(model: ModelConfig, *, tp: int, pp: int, vpp: int = 1, pp_rank: int = 0,
                     vp_stage: int = 0) -> list[ParamTensor]:
    """The parameters of one model chunk, in ``named_parameters()`` order.

    Args:
        model: the architecture.
        tp, pp, vpp: tensor-, pipeline- and virtual-pipeline-parallel sizes.
        pp_rank: this rank's pipeline stage.
        vp_stage: the chunk index on that stage (0 without virtual pipelining).

    Returns:
        one :class:`ParamTensor` per parameter, shapes already split over ``tp``.
    """
    h = model.hidden_size
    head_dim = model.kv_channels or h // model.num_attention_heads
    q_width = model.num_attention_heads * head_dim // tp
    qkv_rows = (model.num_attention_heads + 2 * model.query_groups) * head_dim // tp
    ffn = (model.ffn_hidden_size or 4 * h) // tp
    fc1_rows = 2 * ffn if model.activation == "swiglu" else ffn
    norm_params = ("weight", "bias") if model.normalization == "LayerNorm" else ("weight",)
    bias = model.add_bias_linear
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == pp - 1 and vp_stage == vpp - 1
    tied_across_stages = model.tie_embeddings and pp > 1
    vocab = model.padded_vocab_size(tp) // tp  # this rank's shard of the padded vocabulary

    params: list[ParamTensor] = []

    def add(name: str, *shape: int, shared: bool = False) -> None:
        params.append(ParamTensor(name, tuple(shape), shared))

    if first:
        add("embedding.word_embeddings.weight", vocab, h, shared=tied_across_stages)
        if model.position_embedding_type == "learned_absolute":
            add("embedding.position_embeddings.weight", model.max_position_embeddings, h)
    for i in range(chunk_layers(model.num_layers, pp, vpp)):
        layer = f"decoder.layers.{i}"
        for p in norm_params:
            add(f"{layer}.input_layernorm.{p}", h)
        add(f"{layer}.self_attention.linear_proj.weight", h, q_width)
        if bias:
            add(f"{layer}.self_attention.linear_proj.bias", h)
        add(f"{layer}.self_attention.linear_qkv.weight", qkv_rows, h)
        if bias or model.add_qkv_bias:
            add(f"{layer}.self_attention.linear_qkv.bias", qkv_rows)
        for p in norm_params:
            add(f"{layer}.pre_mlp_layernorm.{p}", h)
        add(f"{layer}.mlp.linear_fc1.weight", fc1_rows, h)
        if bias:
            add(f"{layer}.mlp.linear_fc1.bias", fc1_rows)
        add(f"{layer}.mlp.linear_fc2.weight", h, ffn)
        if bias:
            add(f"{layer}.mlp.linear_fc2.bias", h)
    if last:
        for p in norm_params:
            add(f"decoder.final_layernorm.{p}", h)
        # A tied model on one stage reuses the embedding table; across stages the last stage
        # holds a copy that is kept equal to the first stage's by an all-reduce of their grads.
        if not model.tie_embeddings or tied_across_stages:
            add("output_layer.weight", vocab, h, shared=tied_across_stages)
    return params


@dataclass(frozen=True)
class BufferLayout:
    """Where DDP puts each parameter in its contiguous param/grad buffer."""

    numel: int
    """Buffer elements, padding included (what is allocated)."""
    param_ranges: tuple[tuple[int, int], ...]
    """[start, end) of each parameter, in the order given to :func:`buffer_layout`."""
    bucket_ranges: tuple[tuple[int, int], ...]
    """[start, end) of each bucket (communication unit; sharded over DP ranks)."""

    @property
    def numel_unpadded(self) -> int:
        return sum(end - start for start, end in self.param_ranges)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def buffer_layout(params: list[ParamTensor], *, dp: int, distributed_optimizer: bool = True,
                  bucket_size: int | None = None, pad_for_high_nccl_busbw: bool = False
                  ) -> BufferLayout:
    """Mirror of megatron-core 0.16 ``_ParamAndGradBuffer``'s index computation.

    Args:
        params: the chunk's parameters in ``named_parameters()`` order (all of one dtype).
        dp: data-parallel size.
        distributed_optimizer: pad for even sharding (``use_distributed_optimizer``).
        bucket_size: elements per bucket; None for one bucket (DDP uses None unless
            ``overlap_grad_reduce``, and also on pipeline stages after the first).
        pad_for_high_nccl_busbw: ``DistributedDataParallelConfig.pad_buckets_for_high_nccl_busbw``.

    Returns:
        the :class:`BufferLayout`.
    """
    if distributed_optimizer:
        divisor = math.lcm(dp, 128, 2**16) if pad_for_high_nccl_busbw else math.lcm(dp, 128)
    ranges: dict[int, tuple[int, int]] = {}
    buckets: list[tuple[int, int]] = []
    bucket_start = 0
    bucket_has_params = False
    start = 0
    end = 0

    def close_bucket(param_end: int) -> int:
        nonlocal bucket_start, bucket_has_params
        bucket_end = _round_up(param_end, divisor) if distributed_optimizer else param_end
        buckets.append((bucket_start, bucket_end))
        bucket_start, bucket_has_params = bucket_end, False
        return bucket_end

    # Backprop order: the last parameters' gradients are ready first.
    for index in reversed(range(len(params))):
        param = params[index]
        if distributed_optimizer:
            start = _round_up(start, 64)  # 128-byte aligned starts for 16-bit elements
        own_bucket = param.shared_embedding and distributed_optimizer
        if own_bucket and bucket_has_params:
            start = close_bucket(start)
        end = start + param.numel
        ranges[index] = (start, end)
        bucket_has_params = True
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            start = close_bucket(end)
        else:
            start = end
    if bucket_has_params:
        close_bucket(end)
    numel = buckets[-1][1] if buckets else 0
    return BufferLayout(numel=numel,
                        param_ranges=tuple(ranges[i] for i in range(len(params))),
                        bucket_ranges=tuple(buckets))


def shard_numel(layout: BufferLayout, *, dp: int, dp_rank: int) -> int:
    """Parameter elements (padding excluded) in ``dp_rank``'s shard of every bucket.

    The distributed optimizer keeps fp32 master weights and Adam moments for exactly these.
    """
    total = 0
    for b_start, b_end in layout.bucket_ranges:
        size = (b_end - b_start) // dp
        lo, hi = b_start + dp_rank * size, b_start + (dp_rank + 1) * size
        for p_start, p_end in layout.param_ranges:
            total += max(0, min(hi, p_end) - max(lo, p_start))
    return total


@dataclass(frozen=True)
class StateMemory:
    """Bytes of training state held by one GPU (one DP rank of one pipeline stage)."""

    params: int
    """Model weights (bf16), the DDP parameter buffer including padding."""
    grads: int
    """Gradient buffer (fp32 with ``grad_reduce_in_fp32``), including padding."""
    master_params: int
    """fp32 master copy of this rank's shard (0 when the model itself is fp32)."""
    adam_moments: int
    """Adam's exp_avg and exp_avg_sq (fp32) for this rank's shard."""
    num_params: int
    """Parameters (elements, no padding) on this stage, for reporting."""

    @property
    def optimizer(self) -> int:
        return self.master_params + self.adam_moments

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def state_memory(model: ModelConfig, *, tp: int, pp: int, dp: int, vpp: int = 1,
                 pp_rank: int = 0, dp_rank: int = 0, grad_reduce_in_fp32: bool = True,
                 distributed_optimizer: bool = True, bucket_size: int | None = None
                 ) -> StateMemory:
    """Weights, gradients and Adam state of one GPU, byte-exact for megatron-core 0.16.

    Every model chunk of the stage has its own DDP buffer. ``bucket_size`` applies, as in
    megatron DDP and Megatron-LM's training loop, only to the first chunk of the first stage.
    Without the distributed optimizer every rank holds the master weights and moments of all its
    parameters.
    """
    param_bytes = DTYPE_BYTES[model.params_dtype]
    grad_bytes = 4 if grad_reduce_in_fp32 else param_bytes
    master_bytes = 4 if param_bytes != 4 else 0
    params = grads = shard = num_params = 0
    for vp_stage in range(vpp):
        chunk = chunk_parameters(model, tp=tp, pp=pp, vpp=vpp, pp_rank=pp_rank, vp_stage=vp_stage)
        size = bucket_size if (pp_rank == 0 and vp_stage == 0) else None
        layout = buffer_layout(chunk, dp=dp, distributed_optimizer=distributed_optimizer,
                               bucket_size=size)
        num_params += layout.numel_unpadded
        if distributed_optimizer:
            params += layout.numel * param_bytes
            shard += shard_numel(layout, dp=dp, dp_rank=dp_rank)
        else:
            params += layout.numel_unpadded * param_bytes
            shard += layout.numel_unpadded
        grads += layout.numel * grad_bytes
    return StateMemory(params=params, grads=grads, master_params=shard * master_bytes,
                       adam_moments=shard * 8, num_params=num_params)
