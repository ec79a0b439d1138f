"""Enumerate TP x CP x PP x DP (x VPP) layouts for a cluster, size their memory, rank them.

Per layout the planner computes, for the worst pipeline stage of one GPU:

* training state, byte-exact (:mod:`megatron_ift.planning.params`): bf16 weights, fp32 gradient
  buffer, the distributed optimizer's fp32 master and Adam moment shards;
* activations (:mod:`megatron_ift.planning.activations`) for each recomputation mode, with the
  micro-batches a 1F1B / interleaved schedule holds in flight;
* IFT's extra memory: the estimation pass is forward-only and runs before the training pass, so
  it adds a transient (one layer's working set plus the logits) that does not coexist with the
  training activations, and the token ids kept between the passes;
* context parallelism (CP): every activation term holds ``s / cp`` tokens, the local spec's
  attention keeps the all-gathered keys and values of the whole rows, the IFT step keeps each
  micro-batch's whole rows (ids, labels, mask, positions) for the estimated sequence and the
  weights; the distributed optimizer shards over DP x CP (megatron-core's gradient group).

A layout *fits* when, with the least recomputation that fits, state + activation peak + a fixed
reserve stay within the GPU's memory less a headroom fraction. Fitting layouts are ranked by an estimated step time: compute at an
assumed model-FLOPs utilisation, the pipeline bubble, and tensor-, pipeline- and data-parallel
traffic at assumed bandwidths with no overlap (megatron's defaults overlap none of it here), and
CP's key/value exchange (all-gather forward, reduce-scatter backward; TE's ring moves the same
volume). The estimate orders layouts; it is not a measured throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_ift.models.config import ModelConfig
from megatron_ift.planning.activations import (
    IMPLEMENTATIONS,
    RECOMPUTE,
    MicroBatch,
    StageActivations,
    estimation_pass_bytes,
    stage_peak,
)
from megatron_ift.planning.params import DTYPE_BYTES, StateMemory, state_memory
from megatron_ift.training.metrics import step_flops
from megatron_ift.validation import ConfigError, check_choice, check_positive_int, check_range

GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """The machines: size, memory and the bandwidths the cost model assumes."""

    nodes: int
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs per node; tensor parallelism stays within a node."""
    gpu_memory_gib: float = 79.6
    """Memory per GPU. 80 GB H100/A100 cards expose 81,559 MiB = 79.6 GiB."""
    reserved_gib: float = 3.0
    """Fixed per-GPU overhead outside the model: CUDA context and kernels, NCCL buffers, cuBLAS
    and Transformer Engine workspaces."""
    headroom: float = 0.10
    """Fraction of the memory a plan leaves free, for allocator fragmentation and the error of
    the activation estimates (not yet checked on a GPU): a layout fits when its total stays
    within ``gpu_memory_gib * (1 - headroom)``."""
    intra_node_gbps: float = 360.0
    """Achievable collective bandwidth per GPU inside a node, GB/s (NVLink 4: ~360-450)."""
    inter_node_gbps: float = 40.0
    """Achievable bandwidth per GPU between nodes, GB/s (one 400 Gb/s NIC per GPU)."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM)."""
    mfu: float = 0.40
    """Fraction of the peak the compute reaches, for the step-time estimate."""

    def __post_init__(self) -> None:
        check_positive_int("cluster.nodes", self.nodes)
        check_positive_int("cluster.gpus_per_node", self.gpus_per_node)
        for name in ("gpu_memory_gib", "intra_node_gbps", "inter_node_gbps", "peak_tflops"):
            check_range(f"cluster.{name}", getattr(self, name), 0.0, low_inclusive=False)
        check_range("cluster.reserved_gib", self.reserved_gib, 0.0, self.gpu_memory_gib)
        check_range("cluster.headroom", self.headroom, 0.0, 1.0, high_inclusive=False)
        check_range("cluster.mfu", self.mfu, 0.0, 1.0, low_inclusive=False)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> int:
        """What a plan may use per GPU: the memory less the headroom."""
        return int(self.gpu_memory_gib * (1 - self.headroom) * GIB)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What one training step processes and how the state is kept."""

    seq_length: int = 4096
    """Tokens per sequence."""
    micro_batch_size: int = 1
    """Sequences per micro-batch."""
    global_batch_size: int = 512
    """Sequences per optimizer step (the IFT paper's recipe uses 512)."""
    ift: bool = True
    """Add IFT's estimation pass (forward-only) to memory and compute; False plans plain SFT."""
    logits_chunk_tokens: Optional[int] = None
    """Tokens whose logits the estimation pass materialises at once (None: the micro-batch)."""
    grad_reduce_in_fp32: bool = True
    """fp32 gradient buffer (Megatron-LM's default for bf16 training)."""
    distributed_optimizer: bool = True
    """Shard master weights and Adam moments over data-parallel ranks."""
    implementation: str = "transformer_engine"
    """Layer implementation whose activations are modelled (``local`` is the CPU path)."""
    max_vpp: int = 8
    """Largest virtual-pipeline size considered."""
    max_cp: int = 8
    """Largest context-parallel size considered (1: no context parallelism)."""
    min_cp_rank_tokens: int = 4096
    """Context parallelism is considered only while each rank keeps at least this many tokens of
    a row: below a few thousand, attention chunks are too short for the fused kernels to run
    efficiently and the key/value exchange cannot hide behind them, which the cost model's fixed
    MFU does not see (it would trade DP for CP for a smaller pipeline bubble)."""

    def __post_init__(self) -> None:
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "max_vpp", "max_cp",
                     "min_cp_rank_tokens"):
            check_positive_int(f"workload.{name}", getattr(self, name))
        if self.logits_chunk_tokens is not None:
            check_positive_int("workload.logits_chunk_tokens", self.logits_chunk_tokens)
        check_choice("workload.implementation", self.implementation, IMPLEMENTATIONS)


@dataclass(frozen=True)
class Layout:
    """A parallel layout; sequence parallelism is on whenever TP > 1."""

    tp: int
    pp: int
    dp: int
    vpp: int = 1
    cp: int = 1

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    def label(self) -> str:
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        vpp = f" VPP{self.vpp}" if self.vpp > 1 else ""
        return f"TP{self.tp}{cp} PP{self.pp} DP{self.dp}{vpp}"

    def overrides(self) -> list[str]:
        """The trainer's ``parallel.*`` overrides for this layout."""
        out = [f"parallel.tensor_model_parallel_size={self.tp}",
               f"parallel.context_parallel_size={self.cp}",
               f"parallel.pipeline_model_parallel_size={self.pp}",
               f"parallel.sequence_parallel={'true' if self.sequence_parallel else 'false'}"]
        if self.vpp > 1:
            out.append(f"parallel.virtual_pipeline_model_parallel_size={self.vpp}")
        return out


@dataclass(frozen=True)
class StageMemory:
    """Per-GPU memory of one pipeline stage (its largest data-parallel rank)."""

    pp_rank: int
    state: StateMemory
    activations: dict[str, StageActivations]
    """Training-pass activation peak per recomputation mode."""
    estimation: int
    """IFT estimation pass transient (0 without IFT)."""
    token_ids: int
    """IFT: ids of every micro-batch kept between the estimation and the training pass (with
    CP also every micro-batch's whole rows)."""
    reserved: int

    def activation_peak(self, recompute: str) -> int:
        """Activation memory at the step's peak: training pass or estimation pass."""
        return max(self.activations[recompute].total, self.estimation) + self.token_ids

    def total(self, recompute: str) -> int:
        return self.state.total + self.activation_peak(recompute) + self.reserved


@dataclass(frozen=True)
class StepCost:
    """Estimated seconds of one optimizer step on one GPU, by part."""

    compute: float
    bubble: float
    tp_comm: float
    pp_comm: float
    dp_comm: float
    cp_comm: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.pp_comm + self.dp_comm + self.cp_comm

    @property
    def bubble_fraction(self) -> float:
        return self.bubble / self.compute


@dataclass(frozen=True)
class Candidate:
    """One evaluated layout."""

    layout: Layout
    num_microbatches: int
    worst: StageMemory
    """The stage with the highest total under the chosen (or, if none fits, full) recompute."""
    recompute: Optional[str]
    """Least recomputation that fits; None when even full recomputation does not."""
    cost: StepCost
    capacity: int

    @property
    def fits(self) -> bool:
        return self.recompute is not None

    @property
    def total(self) -> int:
        return self.worst.total(self.recompute or "full")

    def overrides(self) -> list[str]:
        """The trainer's overrides for this candidate: layout and recomputation."""
        return self.layout.overrides() + [f"train.recompute={self.recompute or 'full'}"]


@dataclass(frozen=True)
class Plan:
    """Ranked candidates (fitting first, fastest first) and the layouts ruled out, with why."""

    model: ModelConfig
    cluster: Cluster
    workload: Workload
    candidates: list[Candidate]
    rejected: list[tuple[str, str]] = field(default_factory=list)

    @property
    def best(self) -> Optional[Candidate]:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(model: ModelConfig, cluster: Cluster, workload: Workload
                      ) -> tuple[list[Layout], list[tuple[str, str]]]:
    """Every layout megatron-core can run here, and the ruled-out ones with the reason.

    Rules: TP divides the GPUs of a node (TP traffic stays on NVLink) and the attention heads and
    key/value groups; CP up to ``workload.max_cp``, each rank keeping at least
    ``workload.min_cp_rank_tokens`` tokens of a row, with the sequence a multiple of 2 x CP
    (megatron-core's load-balanced chunks) and, with sequence parallelism, each rank's
    ``s / cp`` tokens a multiple of TP; PP x VPP divides the layers; DP = world / (TP x CP x PP);
    the global batch splits into whole micro-batches per DP rank; interleaving needs PP >= 2 and a
    number of micro-batches divisible by PP (megatron's default micro-batch grouping).
    """
    world = cluster.world_size
    valid: list[Layout] = []
    rejected: list[tuple[str, str]] = []
    s = workload.seq_length
    for tp in _divisors(world):
        if tp > cluster.gpus_per_node or cluster.gpus_per_node % tp:
            rejected.append((f"TP{tp}", f"TP must divide the {cluster.gpus_per_node} GPUs of a "
                                        "node (tensor-parallel traffic needs NVLink)"))
            continue
        if model.num_attention_heads % tp or model.query_groups % tp:
            rejected.append((f"TP{tp}", f"TP must divide {model.num_attention_heads} heads and "
                                        f"{model.query_groups} key/value groups"))
            continue
        for cp in _divisors(world // tp):
            if cp > workload.max_cp:
                continue
            if cp > 1 and s // cp < workload.min_cp_rank_tokens:
                rejected.append((f"CP{cp}", f"{s // cp} tokens per rank is below "
                                            f"min_cp_rank_tokens={workload.min_cp_rank_tokens}"))
                continue
            if cp > 1 and (s % (2 * cp) or (tp > 1 and (s // cp) % tp)):
                rejected.append((f"TP{tp} CP{cp}", f"sequence {s} does not split into 2 x CP "
                                                   "chunks (with TP-divisible ranks' shares)"))
                continue
            for pp in _divisors(world // (tp * cp)):
                dp = world // (tp * cp * pp)
                label = Layout(tp=tp, pp=pp, dp=dp, cp=cp).label()
                if model.num_layers % pp:
                    rejected.append((label, f"PP must divide the {model.num_layers} layers"))
                    continue
                if workload.global_batch_size % (workload.micro_batch_size * dp):
                    rejected.append((label, f"global batch {workload.global_batch_size} is not a "
                                            f"multiple of micro-batch x DP"))
                    continue
                m = workload.global_batch_size // (workload.micro_batch_size * dp)
                for vpp in range(1, workload.max_vpp + 1):
                    if vpp > 1 and (pp < 2 or (model.num_layers // pp) % vpp or m % pp):
                        continue
                    valid.append(Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, cp=cp))
    return valid, rejected


def stage_memory(model: ModelConfig, cluster: Cluster, workload: Workload, layout: Layout,
                 pp_rank: int) -> StageMemory:
    """Memory of one GPU of pipeline stage ``pp_rank`` (the DP rank with the largest shard)."""
    mb = MicroBatch(seq_length=workload.seq_length, micro_batch_size=workload.micro_batch_size,
                    tp=layout.tp, sequence_parallel=layout.sequence_parallel,
                    implementation=workload.implementation, cp=layout.cp)
    m = workload.global_batch_size // (workload.micro_batch_size * layout.dp)
    # Gradients reduce and the distributed optimizer shards over DP x CP. Bucket padding falls
    # on the last rank's shard; compare it with rank 0's.
    dpc = layout.dp * layout.cp
    state = max((state_memory(model, tp=layout.tp, pp=layout.pp, dp=dpc, vpp=layout.vpp,
                              pp_rank=pp_rank, dp_rank=r,
                              grad_reduce_in_fp32=workload.grad_reduce_in_fp32,
                              distributed_optimizer=workload.distributed_optimizer)
                 for r in {0, dpc - 1}), key=lambda s: s.total)
    acts = {rc: stage_peak(model, mb, pp=layout.pp, vpp=layout.vpp, pp_rank=pp_rank,
                           num_microbatches=m, recompute=rc) for rc in RECOMPUTE}
    last = pp_rank == layout.pp - 1
    estimation = ids = 0
    if workload.ift:
        estimation = estimation_pass_bytes(model, mb, last=last,
                                           logits_chunk_tokens=workload.logits_chunk_tokens)
        ids = m * mb.tokens * 8
        if layout.cp > 1:  # whole rows: tokens, labels, positions (int64), loss mask (fp32)
            ids += m * mb.micro_batch_size * mb.seq_length * (3 * 8 + 4)
    return StageMemory(pp_rank=pp_rank, state=state, activations=acts, estimation=estimation,
                       token_ids=ids, reserved=int(cluster.reserved_gib * GIB))


def step_cost(model: ModelConfig, cluster: Cluster, workload: Workload, layout: Layout,
              recompute: str, params_per_gpu: int) -> StepCost:
    """Estimated step time on one GPU (see the module docstring for what it assumes)."""
    tp, pp, dp, vpp, cp = layout.tp, layout.pp, layout.dp, layout.vpp, layout.cp
    p = DTYPE_BYTES[model.params_dtype]
    s, b, h = workload.seq_length, workload.micro_batch_size, model.hidden_size
    m = workload.global_batch_size // (b * dp)
    # Forward passes (activation traffic): training + estimation (IFT) + recomputed (full).
    forward_passes = 1 + (1 if workload.ift else 0) + (1 if recompute == "full" else 0)
    flops = step_flops(model, global_batch_size=workload.global_batch_size, seq_length=s,
                       estimation_pass=workload.ift, full_recompute=recompute == "full")
    compute = flops / (cluster.world_size * cluster.peak_tflops * 1e12 * cluster.mfu)
    bubble = compute * (pp - 1) / (vpp * m)

    def bandwidth(span: int) -> float:
        return 1e9 * (cluster.intra_node_gbps if span <= cluster.gpus_per_node
                      else cluster.inter_node_gbps)

    activation = s // cp * b * h * p  # one rank's share of the micro-batch's hidden states
    layers = model.num_layers // pp
    # Megatron's rank order is tp-cp-dp-pp: a CP group spans tp*cp ranks, the gradient (DP x CP)
    # group tp*cp*dp, a PP group all of them.
    tp_bytes = layers * m * (forward_passes + 1) * 4 * (tp - 1) / tp * activation
    pp_bytes = (vpp * m * (forward_passes + 1) * activation / (tp if layout.sequence_parallel
                                                                else 1)) if pp > 1 else 0.0
    # CP: the whole rows' keys and values of this rank's heads, (cp - 1) / cp of them received
    # per forward, their gradients sent back once per backward.
    d = model.kv_channels or h // model.num_attention_heads
    kv = 2 * s * b * (model.query_groups // tp) * d * p
    cp_bytes = layers * m * (forward_passes + 1) * (cp - 1) / cp * kv
    grad_b = 4 if workload.grad_reduce_in_fp32 else p
    dp_factor = (grad_b + p) if workload.distributed_optimizer else 2 * grad_b
    dpc = dp * cp
    dp_bytes = (dpc - 1) / dpc * params_per_gpu * dp_factor
    return StepCost(compute=compute, bubble=bubble, tp_comm=tp_bytes / bandwidth(tp),
                    pp_comm=pp_bytes / bandwidth(cluster.world_size),
                    dp_comm=dp_bytes / bandwidth(tp * dpc), cp_comm=cp_bytes / bandwidth(tp * cp))


def evaluate(model: ModelConfig, cluster: Cluster, workload: Workload, layout: Layout
             ) -> Candidate:
    """Memory of every stage, least fitting recomputation, step-time estimate."""
    capacity = cluster.usable_bytes
    stages = [stage_memory(model, cluster, workload, layout, r) for r in range(layout.pp)]
    recompute = next((rc for rc in RECOMPUTE
                      if max(st.total(rc) for st in stages) <= capacity), None)
    worst = max(stages, key=lambda st: st.total(recompute or "full"))
    m = workload.global_batch_size // (workload.micro_batch_size * layout.dp)
    cost = step_cost(model, cluster, workload, layout, recompute or "full",
                     max(st.state.num_params for st in stages))
    return Candidate(layout=layout, num_microbatches=m, worst=worst, recompute=recompute,
                     cost=cost, capacity=capacity)


def plan(model: ModelConfig, cluster: Cluster, workload: Workload) -> Plan:
    """Evaluate every valid layout; rank fitting ones by estimated step time, then the rest.

    Raises:
        ConfigError: when no layout is valid at all (e.g. the batch does not divide).
    """
    layouts, rejected = enumerate_layouts(model, cluster, workload)
    if not layouts:
        reasons = "; ".join(f"{label}: {why}" for label, why in rejected[:5])
        raise ConfigError(f"no valid parallel layout for {cluster.world_size} GPUs ({reasons})")
    candidates = [evaluate(model, cluster, workload, layout) for layout in layouts]
    candidates.sort(key=lambda c: (not c.fits, c.cost.total if c.fits else c.total, c.total))
    return Plan(model=model, cluster=cluster, workload=workload, candidates=candidates,
                rejected=rejected)
