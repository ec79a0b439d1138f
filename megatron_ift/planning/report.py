"""Render a :class:`~megatron_ift.planning.planner.Plan` as text or as JSON-ready data."""

from __future__ import annotations

from typing import Any

from megatron_ift.planning.activations import RECOMPUTE
from megatron_ift.planning.planner import GIB, Candidate, Plan


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def memory_rows(candidate: Candidate) -> list[tuple[str, int]]:
    """(label, bytes) rows of the worst stage's per-GPU memory."""
    st = candidate.worst
    rows = [
        ("weights (DDP param buffer)", st.state.params),
        ("gradients (DDP grad buffer)", st.state.grads),
        ("optimizer: fp32 master shard", st.state.master_params),
        ("optimizer: Adam moments shard", st.state.adam_moments),
    ]
    for rc in RECOMPUTE:
        acts = st.activations[rc]
        rows.append((f"activations, recompute {rc} ({acts.in_flight} in flight)", acts.total))
    rows += [
        ("IFT estimation pass (transient)", st.estimation),
        ("IFT token ids between passes (CP: + whole rows)", st.token_ids),
        ("reserved (CUDA context, NCCL, slack)", st.reserved),
    ]
    return rows


def to_dict(plan: Plan, top: int = 10) -> dict[str, Any]:
    """The plan as plain data (``tools/plan.py --json``)."""

    def cand(c: Candidate) -> dict[str, Any]:
        st = c.worst
        return {
            "layout": {"tp": c.layout.tp, "cp": c.layout.cp, "pp": c.layout.pp, "dp": c.layout.dp,
                       "vpp": c.layout.vpp, "sequence_parallel": c.layout.sequence_parallel},
            "label": c.layout.label(),
            "overrides": c.overrides(),
            "fits": c.fits,
            "recompute": c.recompute,
            "num_microbatches": c.num_microbatches,
            "worst_stage": st.pp_rank,
            "memory_bytes": {
                "params": st.state.params, "grads": st.state.grads,
                "optimizer_master": st.state.master_params,
                "optimizer_moments": st.state.adam_moments,
                **{f"activations_{rc}": st.activations[rc].total for rc in RECOMPUTE},
                "ift_estimation_transient": st.estimation, "ift_token_ids": st.token_ids,
                "reserved": st.reserved, "total": c.total, "capacity": c.capacity,
            },
            "num_params_per_gpu": st.state.num_params,
            "step_seconds": {"compute": c.cost.compute, "bubble": c.cost.bubble,
                             "tp_comm": c.cost.tp_comm, "pp_comm": c.cost.pp_comm,
                             "dp_comm": c.cost.dp_comm, "cp_comm": c.cost.cp_comm,
                             "total": c.cost.total},
        }

    best = plan.best
    return {
        "world_size": plan.cluster.world_size,
        "best": cand(best) if best else None,
        "candidates": [cand(c) for c in plan.candidates[:top]],
        "num_candidates": len(plan.candidates),
        "num_fitting": sum(c.fits for c in plan.candidates),
        "rejected": [{"layout": label, "reason": why} for label, why in plan.rejected],
    }


def render(plan: Plan, name: str, top: int = 10) -> str:
    """A human-readable report: the recommended layout's memory, then the ranking."""
    cl, wl, model = plan.cluster, plan.workload, plan.model
    lines = [
        f"{name}: {model.num_parameters() / 1e9:.2f} B parameters, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, vocab {model.vocab_size}",
        f"cluster: {cl.nodes} node(s) x {cl.gpus_per_node} GPUs = {cl.world_size}, "
        f"{cl.gpu_memory_gib:g} GiB each, plans use <= {cl.usable_bytes / GIB:.2f} GiB "
        f"({cl.headroom:.0%} headroom)",
        f"workload: seq {wl.seq_length}, micro-batch {wl.micro_batch_size}, global batch "
        f"{wl.global_batch_size}, {'IFT (estimation pass)' if wl.ift else 'SFT'}, "
        f"{model.params_dtype} weights, {'fp32' if wl.grad_reduce_in_fp32 else 'bf16'} grads, "
        f"{'distributed' if wl.distributed_optimizer else 'replicated'} Adam, "
        f"{wl.implementation} layers",
        "",
    ]
    best = plan.best
    shown = best or plan.candidates[0]
    if best:
        lines.append(f"recommended: {best.layout.label()}"
                     f"{' (sequence parallel)' if best.layout.sequence_parallel else ''}, "
                     f"recompute {best.recompute}, {best.num_microbatches} micro-batches per step")
        lines.append("  trainer overrides: " + " ".join(best.overrides()))
    else:
        lines.append("NO LAYOUT FITS: the closest one (full recomputation) is shown")
    lines.append(f"per-GPU memory, worst stage (stage {shown.worst.pp_rank} of "
                 f"{shown.layout.pp}), {shown.worst.state.num_params / 1e9:.3f} B parameters:")
    for label, value in memory_rows(shown):
        lines.append(f"  {label:<48}{_gib(value)}")
    lines.append(f"  {'total (recompute ' + (shown.recompute or 'full') + ')':<48}"
                 f"{_gib(shown.total)}  of {_gib(shown.capacity).strip()} usable")
    lines += ["", f"layouts ({sum(c.fits for c in plan.candidates)} of {len(plan.candidates)} "
                  f"fit; ranked by estimated step time, top {min(top, len(plan.candidates))}):",
              f"  {'#':>2}  {'layout':<20}{'fits':<6}{'recompute':<11}{'GiB':>7}{'bubble':>8}"
              f"{'tp s':>7}{'cp s':>7}{'pp s':>7}{'dp s':>7}{'step s':>8}"]
    for i, c in enumerate(plan.candidates[:top], 1):
        lines.append(f"  {i:>2}  {c.layout.label():<20}{'yes' if c.fits else 'no':<6}"
                     f"{c.recompute or '-':<11}{c.total / GIB:7.1f}{c.cost.bubble_fraction:8.1%}"
                     f"{c.cost.tp_comm:7.2f}{c.cost.cp_comm:7.2f}{c.cost.pp_comm:7.2f}{c.cost.dp_comm:7.2f}"
                     f"{c.cost.total:8.2f}")
    if plan.rejected:
        lines.append("  ruled out: " + "; ".join(sorted({f'{l}: {w}' for l, w in plan.rejected}
                                                         )[:6]))
    lines += ["", "Estimates: state bytes are exact for megatron-core 0.16; activations are exact "
                  "for the local spec (CPU-checked) and derived for Transformer Engine (not yet "
                  "checked on a GPU); step times assume the bandwidths and MFU of the cluster "
                  "settings and no overlap."]
    return "\n".join(lines)
