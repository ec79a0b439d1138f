"""The layout planner: buffer arithmetic, schedules, Llama-3 plans and the tools/plan.py CLI.

Byte-exactness against real megatron-core objects is tests/distributed/test_plan_memory.py; these tests are
in-process and take about a second.
"""
import os
import warnings
from types import SimpleNamespace

import pytest
from _infra import ROOT

from megatron_ift.planning import (
    Cluster,
    ParamTensor,
    Workload,
    buffer_layout,
    chunk_parameters,
    get_preset,
    plan,
    render,
    shard_numel,
    state_memory,
)
from megatron_ift.planning.activations import in_flight_microbatches
from megatron_ift.validation import ConfigError


def test_buffer_layout_hand_computed():
    # Reverse order: b (10) at [0, 10); a (100) starts at the next multiple of 64: [64, 164);
    # the bucket ends at a multiple of lcm(dp=2, 128) = 128: 256 elements.
    params = [ParamTensor("a", (10, 10)), ParamTensor("b", (10,))]
    layout = buffer_layout(params, dp=2)
    assert layout.param_ranges == ((64, 164), (0, 10))
    assert layout.bucket_ranges == ((0, 256),)
    # Rank 0 owns [0, 128): all of b and a[64:128); rank 1 owns [128, 256): a's last 36.
    assert shard_numel(layout, dp=2, dp_rank=0) == 10 + 64
    assert shard_numel(layout, dp=2, dp_rank=1) == 36
    # Without the distributed optimizer nothing is padded.
    assert buffer_layout(params, dp=2, distributed_optimizer=False).numel == 110


@pytest.mark.parametrize("dp", [1, 3, 8, 64])
@pytest.mark.parametrize("bucket_size", [None, 300_000_000, 50_000_000])
def test_every_element_is_owned_by_exactly_one_dp_rank(dp, bucket_size):
    params = chunk_parameters(get_preset("llama3-8b"), tp=8, pp=1)
    layout = buffer_layout(params, dp=dp, bucket_size=bucket_size)
    owned = [shard_numel(layout, dp=dp, dp_rank=r) for r in range(dp)]
    assert sum(owned) == layout.numel_unpadded == sum(p.numel for p in params)
    for start, end in layout.bucket_ranges:
        assert (end - start) % dp == 0 and (end - start) % 128 == 0
    if bucket_size:
        # A bucket closes once it holds bucket_size elements; only the last may hold fewer.
        assert len(layout.bucket_ranges) > 1
        assert all(end - start >= bucket_size for start, end in layout.bucket_ranges[:-1])


@pytest.mark.parametrize("name, count", [("llama3-8b", 8_030_261_248),
                                         ("llama3-70b", 70_553_706_496)])
def test_llama3_parameter_counts_match_the_published_ones(name, count):
    model = get_preset(name)
    assert model.num_parameters() == count
    # Every pipeline/virtual-pipeline split holds each parameter exactly once.
    for pp, vpp in [(1, 1), (2, 1), (4, 2), (8, 1)]:
        stages = [state_memory(model, tp=1, pp=pp, dp=1, vpp=vpp, pp_rank=r) for r in range(pp)]
        assert sum(s.num_params for s in stages) == count


def test_bytes_per_parameter_of_the_distributed_optimizer():
    # bf16 weights (2) + fp32 grads (4) on every rank, fp32 master + 2 moments (12) sharded:
    # the classic 6 + 12/dp bytes per parameter, up to DDP padding.
    model = get_preset("llama3-8b")
    for dp in (1, 2, 8):
        st = state_memory(model, tp=1, pp=1, dp=dp)
        assert st.total == pytest.approx(st.num_params * (6 + 12 / dp), rel=1e-5)


class _Group:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("pp, vpp, m", [(4, 1, 8), (4, 1, 2), (4, 2, 8), (2, 4, 4), (8, 5, 256),
                                        (8, 2, 8)])
def test_in_flight_microbatches_follow_megatron_schedules(pp, vpp, m):
    warnings.filterwarnings("ignore")
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    for rank in range(pp):
        comm = SimpleNamespace(pp_group=_Group(pp, rank),
                               virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
        total, _, warmup, _ = get_pp_rank_microbatches(m, vpp, pp, forward_only=False,
                                                       p2p_communicator=comm)
        assert in_flight_microbatches(pp=pp, vpp=vpp, pp_rank=rank,
                                      num_microbatches=m) == min(total, warmup + 1)


@pytest.fixture(scope="module")
def plan_70b():
    return plan(get_preset("llama3-70b"), Cluster(nodes=8, gpus_per_node=8),
                Workload(seq_length=4096, micro_batch_size=1, global_batch_size=512))


def test_llama3_70b_on_64_gpus_has_a_fitting_layout(plan_70b):
    best = plan_70b.best
    assert best is not None and best.fits
    layout = best.layout
    assert layout.tp * layout.pp * layout.dp == 64 and layout.tp <= 8
    assert best.total <= best.capacity
    # Ranking: fitting layouts first, by estimated step time.
    fitting = [c for c in plan_70b.candidates if c.fits]
    assert plan_70b.candidates[:len(fitting)] == fitting
    assert [c.cost.total for c in fitting] == sorted(c.cost.total for c in fitting)
    # Tensor parallelism never leaves a node; TP 16 is ruled out with the reason.
    assert all(c.layout.tp <= 8 for c in plan_70b.candidates)
    assert any(label == "TP16" and "GPUs of a node" in why for label, why in plan_70b.rejected)
    # Pure data parallelism cannot hold 70B of bf16 weights + fp32 grads per GPU.
    dp64 = next(c for c in plan_70b.candidates if c.layout.dp == 64)
    assert not dp64.fits


def test_docs_quote_the_current_70b_plan(plan_70b):
    """docs/scale_out.md shows the planner's output; it must not drift from the code."""
    text = render(plan_70b, "llama3-70b")
    with open(os.path.join(ROOT, "docs", "scale_out.md"), encoding="utf-8") as f:
        docs = f.read()
    for key in ("recommended:", "total (recompute", "weights (DDP param buffer)",
                "activations, recompute none"):
        line = next(ln for ln in text.splitlines() if key in ln)
        assert line in docs, f"docs/scale_out.md is stale; regenerate: {line!r}"


def test_ift_adds_its_estimation_pass_and_token_ids(plan_70b):
    sft = plan(get_preset("llama3-70b"), Cluster(nodes=8),
               Workload(seq_length=4096, global_batch_size=512, ift=False))
    layout = plan_70b.best.layout
    ift_c = next(c for c in plan_70b.candidates if c.layout == layout)
    sft_c = next(c for c in sft.candidates if c.layout == layout)
    assert sft_c.worst.estimation == 0 and sft_c.worst.token_ids == 0
    assert ift_c.worst.token_ids == ift_c.num_microbatches * 4096 * 8
    # Forward-only and run before the training pass: IFT never costs more than the larger of
    # its transient and the training activations, plus the ids.
    extra = ift_c.total - sft_c.total
    assert 0 < extra <= ift_c.worst.estimation + ift_c.worst.token_ids
    # ... and one more forward pass of compute: (F + F + 2F) / (F + 2F) = 4/3.
    assert ift_c.cost.compute / sft_c.cost.compute == pytest.approx(4 / 3)


def test_impossible_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="no valid parallel layout"):
        plan(get_preset("llama3-8b"), Cluster(nodes=1, gpus_per_node=8),
             Workload(global_batch_size=3, micro_batch_size=2))


def test_context_parallel_activations_are_one_rank_s_share():
    """CP: every Transformer Engine term holds s / cp tokens (TE's ring keeps only local keys and
    values); the local spec's all-gather keeps the whole rows' keys and values on top."""
    from megatron_ift.planning.activations import MicroBatch, layer_terms, saved_bytes

    model = get_preset("llama3-8b")
    kw = dict(num_layers=4, first=True, last=True)
    one = MicroBatch(seq_length=32768, micro_batch_size=1, tp=2, sequence_parallel=True)
    four = MicroBatch(seq_length=32768, micro_batch_size=1, tp=2, sequence_parallel=True, cp=4)
    assert 4 * saved_bytes(model, four, **kw) == saved_bytes(model, one, **kw)
    local = dict(tp=2, sequence_parallel=True, implementation="local")
    t1 = layer_terms(model, MicroBatch(seq_length=32768, micro_batch_size=1, **local))
    t4 = layer_terms(model, MicroBatch(seq_length=32768, micro_batch_size=1, cp=4, **local))
    shared = set(t1) & set(t4)
    assert len(shared) >= 8 and all(4 * t4[k] == t1[k] for k in shared)
    # whole rows' k and v: 2 x s x groups/tp x head dim x bf16
    assert t4["k, v all-gathered over CP"] == 2 * 32768 * (8 // 2) * 128 * 2
    assert "qkv output (v view)" not in t4  # v is gathered, not a view of the projection
    with pytest.raises(ValueError, match="multiple of 2 x cp"):
        MicroBatch(seq_length=100, micro_batch_size=1, cp=4)


def test_long_sequences_plan_context_parallelism():
    """32k tokens on one node: the planner picks CP (smaller activations than TP alone, less
    traffic); short sequences never get it (min_cp_rank_tokens); CP shards the optimizer over
    DP x CP and adds the key/value exchange to the step time."""
    model, node = get_preset("llama3-8b"), Cluster(nodes=1, gpus_per_node=8)
    long = plan(model, node, Workload(seq_length=32768))
    best = long.best
    assert best.layout.cp > 1 and "parallel.context_parallel_size=%d" % best.layout.cp in best.overrides()
    assert best.cost.cp_comm > 0
    assert any(c.layout.cp == 1 for c in long.candidates)
    short = plan(model, node, Workload(seq_length=4096))
    assert all(c.layout.cp == 1 for c in short.candidates)
    assert any(why.startswith("2048 tokens per rank") for _, why in short.rejected)
    # the same GPUs as data-parallel ranks or as context-parallel ranks: the same optimizer shard
    cp2 = next(c for c in long.candidates if (c.layout.tp, c.layout.cp, c.layout.pp, c.layout.dp, c.layout.vpp) == (2, 2, 2, 1, 1))
    dp2 = next(c for c in plan(model, node, Workload(seq_length=32768, max_cp=1)).candidates
               if (c.layout.tp, c.layout.pp, c.layout.dp, c.layout.vpp) == (2, 2, 2, 1))
    assert cp2.worst.state == dp2.worst.state and cp2.cost.dp_comm == dp2.cost.dp_comm
    assert cp2.cost.cp_comm > 0 == dp2.cost.cp_comm
    # CP halves the tokens per rank; DP halves the micro-batches: training activations halve both ways
    assert cp2.worst.activations["none"].saved < dp2.worst.activations["none"].saved * 1.01


def test_plan_cli_shows_context_parallelism(capsys):
    from megatron_ift.planning.cli import main

    assert main(["--preset", "llama3-8b", "--seq-length", "32768"]) == 0
    out = capsys.readouterr().out
    assert "CP4" in out and "cp s" in out and "parallel.context_parallel_size=4" in out
    assert main(["--preset", "llama3-8b", "--seq-length", "32768", "--max-cp", "1"]) == 0
    assert "parallel.context_parallel_size=1" in capsys.readouterr().out
