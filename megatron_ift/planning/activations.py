"""Activation memory of a megatron-core GPT stage: saved tensors, in-flight micro-batches, IFT.

Accounting unit: the bytes of distinct tensor storages that autograd keeps for backward
(parameters excluded), per model chunk and micro-batch. The terms follow megatron-core 0.16's
code path tensor by tensor; each is named so that a report or a failing test can say which one
is off. Notation: ``n = s * b`` tokens, ``n_sp = n / tp`` under sequence parallelism (else ``n``),
``p`` bytes per element of the compute dtype, heads ``a``, key/value groups ``g``, head dim ``d``.

Two implementations are modelled:

* ``local``: megatron-core's local layer spec with torch norms, what runs on the CPU here. Its
  norms upcast to fp32. Its core attention is either PyTorch's fused SDPA
  (``model.attention_backend`` auto / sdpa: q, k, the qkv output that v views, the kernel's
  output (which the output projection reads as a view) and fp32 log-sum-exp statistics;
  grouped k / v are never expanded) or megatron-core's
  unfused ``DotProductAttention`` (``local``: expanded k / v and ``b * a * s^2`` softmax
  tensors). These terms are checked byte for byte against
  ``torch.autograd.graph.saved_tensors_hooks`` on real models (tests/distributed/test_plan_memory.py).
* ``transformer_engine``: the GPU path (TE's fused norm + linear and fused/flash attention). Its
  norm and attention terms are derived from Transformer Engine's saved tensors (input, ``ln_out``
  and ``rstd``; ``q``, ``k``, ``v``, output and the fp32 softmax statistics), not measured: no GPU
  run has checked them yet. The MLP, rotary and loss terms are the same megatron-core code in
  both paths.

Transient memory that is not saved for backward (the logits before the loss upcasts them, a
recomputed layer during backward, the IFT estimation pass) is modelled in :func:`stage_peak` and
:func:`estimation_pass_bytes` and stated as an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ift.models.config import ModelConfig
from megatron_ift.planning.params import DTYPE_BYTES, chunk_layers
from megatron_ift.validation import check_choice

RECOMPUTE = ("none", "selective", "full")
IMPLEMENTATIONS = ("transformer_engine", "local")


@dataclass(frozen=True, kw_only=True)
class MicroBatch:
    """The shape of one micro-batch on one rank."""

    seq_length: int
    """Tokens per sequence."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    tp: int = 1
    """Tensor-parallel size."""
    sequence_parallel: bool = False
    """Norm/dropout regions hold ``s / tp`` of the sequence (megatron's sequence parallelism)."""
    implementation: str = "transformer_engine"
    """``transformer_engine`` (GPU) or ``local`` (megatron-core local spec, CPU)."""
    cp: int = 1
    """Context-parallel size: this rank holds ``s / cp`` tokens of every row."""

    def __post_init__(self) -> None:
        check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        if self.seq_length % (2 * self.cp if self.cp > 1 else 1):
            raise ValueError(f"seq_length {self.seq_length} is not a multiple of 2 x cp = {2 * self.cp}")

    @property
    def local_seq(self) -> int:
        """Tokens of one row on this rank."""
        return self.seq_length // self.cp

    @property
    def tokens(self) -> int:
        """Tokens of the micro-batch on this rank."""
        return self.local_seq * self.micro_batch_size

    @property
    def sp_tokens(self) -> int:
        return self.tokens // self.tp if self.sequence_parallel else self.tokens


def _dims(model: ModelConfig, mb: MicroBatch) -> tuple[int, int, int, int, int, int]:
    """(p, h, heads/tp, groups/tp, head dim, ffn/tp)."""
    p = DTYPE_BYTES[model.params_dtype]
    d = model.kv_channels or model.hidden_size // model.num_attention_heads
    ffn = (model.ffn_hidden_size or 4 * model.hidden_size) // mb.tp
    return (p, model.hidden_size, model.num_attention_heads // mb.tp, model.query_groups // mb.tp,
            d, ffn)


def _norm_bytes(model: ModelConfig, mb: MicroBatch, fused_with_linear: bool) -> int:
    p, h = DTYPE_BYTES[model.params_dtype], model.hidden_size
    n = mb.sp_tokens
    if mb.implementation == "local":
        # torch.nn.RMSNorm on the CPU upcasts: keeps x and x*rstd in fp32 and rstd;
        # torch.nn.LayerNorm keeps its input and mean/rstd in the input dtype.
        if model.normalization == "RMSNorm":
            return n * (2 * h * 4 + 4)
        return n * (h + 2) * p
    stats = 4 if model.normalization == "RMSNorm" else 8  # rstd (and mean), fp32
    # TE keeps the input and the statistics; a norm fused into the next linear layer also keeps
    # its output (ln_out) for that layer's weight gradient.
    return n * ((2 if fused_with_linear else 1) * h * p + stats)


def layer_terms(model: ModelConfig, mb: MicroBatch, recompute: str = "none") -> dict[str, int]:
    """Saved bytes of one transformer layer for one micro-batch, by term.

    Args:
        recompute: ``none``; ``selective`` (megatron's ``core_attn`` recomputation: attention
            scores are recomputed from the saved q, k, v); ``full`` (each layer keeps only its
            input and is recomputed in backward).
    """
    check_choice("recompute", recompute, RECOMPUTE)
    p, h, a, g, d, ffn = _dims(model, mb)
    n, n_sp, s, b = mb.tokens, mb.sp_tokens, mb.local_seq, mb.micro_batch_size
    if recompute == "full":
        return {"layer input (checkpoint)": n_sp * h * p}
    local = mb.implementation == "local"
    rot = int(d * model.rotary_percent) if model.position_embedding_type == "rope" else 0
    terms: dict[str, int] = {}
    terms["input norm"] = _norm_bytes(model, mb, fused_with_linear=not local)
    if local:
        terms["qkv input"] = n_sp * h * p  # the norm output, before the sequence all-gather
    # cos and sin, each cast to the activation dtype for q and for k.
    terms["rotary cos/sin"] = 4 * s * rot * p
    # v is a view of the fused qkv projection output, so that whole output stays alive; q and
    # k are new tensors after the rotary embedding. Without grouping (g == a) the local
    # attention keeps that view; with grouping it keeps copies of k and v expanded to a heads.
    qkv_storage = n * (a + 2 * g) * d * p
    if recompute == "selective":
        terms["q, k (checkpointed)"] = n * (a + g) * d * p
        terms["qkv output (v view)"] = qkv_storage
        terms["mask type (int32)"] = 4
    elif local and model.attention_backend != "local" and mb.cp > 1:
        # Context parallelism (SDPAttention's all-gather scheme): the keys and values of the
        # whole rows, gathered and put in sequence order (one int64 index), are what the kernel
        # keeps; the local k and the qkv output are not saved. Each of the rank's two chunks is
        # its own kernel call: two outputs besides their concatenation ("attention output").
        # (The chunks' causal masks are shared by all layers: cp_mask_bytes.)
        terms["q"] = n * a * d * p
        terms["k, v all-gathered over CP"] = 2 * b * mb.seq_length * g * d * p
        terms["CP sequence-order index (int64)"] = 8 * mb.seq_length
        terms["softmax statistics (fp32)"] = 4 * b * a * s
        terms["chunk outputs"] = n * a * d * p
    elif local and model.attention_backend != "local":
        terms["q, k"] = n * (a + g) * d * p
        terms["qkv output (v view)"] = qkv_storage
        # The kernel's output is also the "attention output" below: its [b, s, a, d] storage
        # viewed as [s, b, a * d] is what the output projection saves.
        terms["softmax statistics (fp32)"] = 4 * b * a * s
    elif local:
        terms["q, k (expanded)"] = 2 * n * a * d * p
        terms["v"] = n * a * d * p if a > g else qkv_storage
        terms["softmax (fp32)"] = 4 * b * a * s * s
        if p != 4:
            terms["attention probs"] = p * b * a * s * s
        terms["causal mask"] = s * s
    else:
        terms["q, k"] = n * (a + g) * d * p
        terms["qkv output (v view)"] = qkv_storage
        terms["softmax statistics (fp32)"] = 4 * b * a * s
    terms["attention output"] = n * a * d * p
    terms["pre-MLP norm"] = _norm_bytes(model, mb, fused_with_linear=not local)
    if local:
        terms["fc1 input"] = n_sp * h * p
    if model.activation == "swiglu":
        # fc1 output [n, 2 ffn]; silu(gate) and (linear + offset) are new tensors: megatron's
        # unfused GLU (bias_activation_fusion is off in megatron_ift.models.gpt).
        terms["fc1 output + GLU"] = 4 * n * ffn * p
    else:
        terms["fc1 output"] = n * ffn * p
    terms["fc2 input"] = n * ffn * p
    if model.hidden_dropout > 0:
        terms["dropout masks"] = 2 * n_sp * h
    return terms


def embedding_terms(model: ModelConfig, mb: MicroBatch) -> dict[str, int]:
    """Saved bytes of the first stage's embedding for one micro-batch."""
    terms = {"token ids": mb.tokens * 8}
    if mb.tp > 1:
        # The vocab-parallel lookup masks ids outside this rank's shard (a bool per token).
        terms["vocab shard mask"] = mb.tokens
    if model.position_embedding_type == "learned_absolute":
        terms["position ids"] = mb.tokens * 8
    return terms


def output_terms(model: ModelConfig, mb: MicroBatch) -> dict[str, int]:
    """Saved bytes of the last stage's final norm, output layer and vocab-parallel loss."""
    p = DTYPE_BYTES[model.params_dtype]
    n, n_sp, h = mb.tokens, mb.sp_tokens, model.hidden_size
    vocab = model.padded_vocab_size(mb.tp) // mb.tp
    return {
        "final norm": _norm_bytes(model, mb, fused_with_linear=False),
        "output layer input": n_sp * h * p,
        # megatron's vocab-parallel cross entropy keeps the fp32 softmax of the local vocabulary
        # shard, the target mask and the masked targets.
        "softmax over vocab shard (fp32)": n * vocab * 4,
        "targets (int64) + mask": n * 9,
    }


def cp_mask_bytes(model: ModelConfig, mb: MicroBatch) -> int:
    """The lower-right causal masks of a context-parallel rank's chunks on the CPU path.

    The local spec's attention under CP on a CPU keeps one cached additive mask per chunk shape,
    ``[c, (g + 1) c]`` in the compute dtype for the rank's chunks ``g = r`` and ``2 cp - 1 - r``
    (CP rank 0's first chunk is plain causal, without one), by reference in every layer and
    micro-batch (with recomputation the cache holds them all the same): counted once per rank.
    This is the worst rank's (``r >= 1``): ``c^2 (2 cp + 1)`` elements. On CUDA the kernels take
    the causal shape without a mask: 0.
    """
    if mb.cp == 1 or mb.implementation != "local" or model.attention_backend == "local":
        return 0
    c = mb.local_seq // 2
    return c * c * (2 * mb.cp + 1) * DTYPE_BYTES[model.params_dtype]


def saved_bytes(model: ModelConfig, mb: MicroBatch, *, num_layers: int, first: bool, last: bool,
                recompute: str = "none", shared: bool = True) -> int:
    """Bytes autograd keeps for one micro-batch through one chunk of ``num_layers`` layers
    (``shared``: with the tensors every micro-batch's layers keep by reference,
    :func:`cp_mask_bytes`)."""
    total = num_layers * sum(layer_terms(model, mb, recompute).values())
    if shared and recompute == "none":  # (recomputed attention keeps no reference)
        total += cp_mask_bytes(model, mb)
    if recompute == "full" and model.position_embedding_type == "rope":
        # The checkpointed layers share one fp32 rotary frequency table as an input.
        d = model.kv_channels or model.hidden_size // model.num_attention_heads
        total += mb.local_seq * int(d * model.rotary_percent) * 4
    if first:
        total += sum(embedding_terms(model, mb).values())
    if last:
        total += sum(output_terms(model, mb).values())
    return total


def in_flight_microbatches(*, pp: int, vpp: int, pp_rank: int, num_microbatches: int) -> int:
    """Chunk micro-batches whose activations a stage holds at its peak (megatron schedules).

    1F1B: ``pp - rank`` warm-up forwards plus one. Interleaved (vpp > 1), with megatron's
    default ``microbatch_group_size_per_vp_stage = pp``: ``2 (pp - rank - 1) + (vpp - 1) pp``
    warm-up chunk forwards plus one, each chunk holding ``L / (pp * vpp)`` layers.
    """
    if pp == 1:
        return 1
    if vpp == 1:
        return min(num_microbatches, pp - pp_rank)
    warmup = 2 * (pp - pp_rank - 1) + (vpp - 1) * pp
    return min(num_microbatches * vpp, warmup + 1)


@dataclass(frozen=True)
class StageActivations:
    """Activation memory of one pipeline stage at its peak, by part."""

    saved: int
    """Saved tensors of all in-flight micro-batches."""
    transient: int
    """Not-saved working memory at the peak: logits before the loss upcasts them (last stage),
    one layer's recomputed activations (full recomputation)."""
    in_flight: int
    """Chunk micro-batches held."""

    @property
    def total(self) -> int:
        return self.saved + self.transient


def stage_peak(model: ModelConfig, mb: MicroBatch, *, pp: int, vpp: int, pp_rank: int,
               num_microbatches: int, recompute: str) -> StageActivations:
    """Peak activation memory of pipeline stage ``pp_rank`` during the training pass."""
    layers = chunk_layers(model.num_layers, pp, vpp)
    in_flight = in_flight_microbatches(pp=pp, vpp=vpp, pp_rank=pp_rank,
                                       num_microbatches=num_microbatches)
    first, last = pp_rank == 0, pp_rank == pp - 1
    saved = in_flight * saved_bytes(model, mb, num_layers=layers, first=False, last=False,
                                    recompute=recompute, shared=False)
    saved += cp_mask_bytes(model, mb)  # cached: once, whatever the recomputation
    # Embedding inputs are tiny; count them for every in-flight chunk (an upper bound). The
    # loss chunk's backward follows its forward directly, so one micro-batch of it is held.
    if first:
        saved += in_flight * sum(embedding_terms(model, mb).values())
    if last:
        saved += sum(output_terms(model, mb).values())
    transient = 0
    if recompute == "full":
        transient += sum(layer_terms(model, mb, "none").values())
    if last:
        p = DTYPE_BYTES[model.params_dtype]
        transient += mb.tokens * (model.padded_vocab_size(mb.tp) // mb.tp) * p
    return StageActivations(saved=saved, transient=transient, in_flight=in_flight)


def estimation_pass_bytes(model: ModelConfig, mb: MicroBatch, *, last: bool,
                          logits_chunk_tokens: int | None = None) -> int:
    """Transient peak of IFT's estimation pass on one stage (an estimate, not measured).

    The pass is forward-only (no grad) and runs before the training pass, so nothing is saved:
    the peak is one layer's working set (bounded by what that layer would save) plus its input
    and output hidden states, and on the last stage the logits of ``logits_chunk_tokens`` tokens
    (all ``s * b`` by default) in the compute dtype plus an fp32 copy for the estimator.
    """
    p = DTYPE_BYTES[model.params_dtype]
    total = sum(layer_terms(model, mb, "none").values()) + 2 * mb.sp_tokens * model.hidden_size * p
    if last:
        tokens = min(logits_chunk_tokens or mb.tokens, mb.tokens)
        total += tokens * (model.padded_vocab_size(mb.tp) // mb.tp) * (p + 4)
    return total
