"""The two-pass IFT step at every parallel layout equals the single-process reference.

One reference run per configuration (plain autograd on a TP1/PP1 model, the spec oracle in
``tests/_infra/reference.py``, torch AdamW) writes the shared initial weights, the gradients and the
parameters after one step. Each layout then runs our step through megatron-core's schedules
(DDP, optionally the distributed optimizer) from the same weights and data, loads the reference
tensors into its own layout (dist_checkpointing reshards them) and reports per-parameter errors.

Process starts dominate the cost, so specs of the same world size share one launch: the
references (computed on two data-parallel replicas of the TP1/PP1 model), every 2-process layout
and the SFT-limit check in one, the 4-process layouts in another. (A 1-process layout would need
a launch of its own; the TP1/PP1/DP2 row runs the same unsharded step on each rank.) Each spec
writes its own result; when a launch fails, the spec it stopped at is charged with the failure
and the launch is started again with the specs after it, so a broken layout fails its own test
and no other.

Tolerances (float32): loss and every gradient within 1e-5 relative to the tensor's largest
entry; parameters after one Adam step within 1e-5 relative plus 1% of one learning-rate step
(Adam's ``g / (|g| + eps)`` amplifies reduction-order noise in near-zero gradients).
"""

import json
import os
import time
from typing import NamedTuple, Optional

import pytest
from _infra.launch import torchrun

# over a minute with the module fixture (tests/_infra/plugin.py orders slow files first)
pytestmark = [pytest.mark.slow]

GLOBAL_BATCH, SEQ, MBS, SEED = 8, 16, 2, 3
# adam_eps 1e-6, not 1e-8: Adam's first step is lr * g / (|g| + eps), whose sensitivity to the
# gradient peaks at |g| ~ eps; with eps 1e-8 an entry whose gradient is ~1e-8 (float32 noise
# level of a 1e-2-scale tensor) turns a 1e-9 rounding difference into 2 % of a step.
OPTIM = dict(lr=1e-4, adam_eps=1e-6, clip_grad=1.0, weight_decay=0.0, lr_decay_style="constant")
CONFIGS = {
    "ift": dict(ift=dict(gamma=0.95, max_lambda=0.2), model={}),
    "detached_tied": dict(
        ift=dict(gamma=0.5, max_lambda=0.3, mixing_embeddings="detached", estimator="kth",
                 aggregation="token_mean", propagation_norm="L2"),
        model=dict(tie_embeddings=True),
    ),
    "detached_untied": dict(ift=dict(gamma=0.95, max_lambda=0.2, mixing_embeddings="detached"), model={}),
    # packed rows: two samples and a padding segment per row (block-diagonal attention, positions
    # restarting per segment, weights and estimates per segment)
    "packed": dict(ift=dict(gamma=0.95, max_lambda=0.2), model={}, packed=True),
    # a sampling estimator: nucleus sampling whose noise is keyed on (seed, step, sample,
    # position, global vocabulary id), so every layout draws the reference's tokens
    "top_p": dict(ift=dict(gamma=0.95, max_lambda=0.5, estimator="top_p", top_p=0.9,
                           temperature=1.5, seed=11), model={}),
    # conversations of two turns: answer spans with a user turn between them
    "multi_turn": dict(ift=dict(gamma=0.9, max_lambda=0.3), model={}, multi_turn=True),
    # plain sampling, weights propagated to the right with a softmax norm, on packed rows
    "right_sample": dict(ift=dict(gamma=0.9, max_lambda=0.4, estimator="sample", temperature=1.2,
                                  propagation_side="right", propagation_norm="softmax", seed=5),
                         model={}, packed=True),
}


class Run(NamedTuple):
    """One layout: a config of :data:`CONFIGS` at tensor/pipeline/data/virtual/context-parallel
    sizes, with sequence parallelism and the distributed optimizer or not."""
    config: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    distopt: bool = False
    cp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def id(self) -> str:
        return (f"{self.config}-tp{self.tp}-pp{self.pp}-dp{self.dp}" + (f"-cp{self.cp}" if self.cp > 1 else "")
                + (f"-vpp{self.vpp}" if self.vpp else "") + ("-sp" if self.sp else "")
                + ("-distopt" if self.distopt else ""))


RUNS = [
    Run("ift", tp=2),
    Run("ift", pp=2),
    Run("ift", dp=2),
    Run("ift", dp=2, distopt=True),
    Run("ift", tp=2, pp=2),
    Run("ift", pp=2, dp=2, distopt=True),
    Run("ift", pp=2, vpp=2),
    Run("ift", tp=2, sp=True),
    Run("detached_tied", tp=2),
    Run("detached_tied", pp=2),
    Run("detached_untied", tp=2),
    Run("packed", tp=2),
    Run("packed", pp=2),
    Run("top_p", tp=2),  # the vocabulary split: noise per global id
    Run("top_p", dp=2),  # the batch split: noise per global sample id
    # context parallelism: estimates, weights and the loss cross the chunk boundaries
    Run("ift", cp=2),
    Run("ift", cp=4),  # chunks of 2 tokens: nearly every dependency crosses ranks
    Run("ift", tp=2, cp=2, sp=True),
    Run("ift", pp=2, cp=2),
    Run("ift", dp=2, cp=2, distopt=True),
    Run("packed", cp=2),  # block mask of global positions, segments across chunks
    Run("detached_tied", cp=2),  # kth estimator, L2 weights, token mean, tied output layer
    Run("top_p", cp=2),  # noise keyed on global positions
    Run("right_sample", cp=2),
    Run("right_sample", tp=2),
    Run("multi_turn", cp=2),
    Run("multi_turn", tp=2),
]

SFT_EXACT = "sft_exact"


def _launch(world: int, specs: list[dict], failures: dict[str, str]) -> None:
    """Run ``specs`` in as few ``world``-process launches as their failures allow.

    A spec is done when its ``done`` file exists. After a failed launch the first unfinished
    spec gets the launch's output in ``failures`` and the rest run in a new launch.
    """
    pending = [s for s in specs if s["id"] not in failures]
    while pending:
        try:
            torchrun("step_parallel.py", world, json.dumps(pending), timeout=600)  # a hang, not a slow machine
            return
        except AssertionError as exc:
            rest = [s for s in pending if not os.path.exists(s["done"])]
            if not rest:
                raise
            failures[rest[0]["id"]] = f"{rest[0]['id']} failed in its launch:\n{exc}"
            # a layout whose reference failed is not run: its test reports the reference's failure
            pending = [s for s in rest[1:] if f"reference {s.get('config')}" not in failures]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``{id: (result, reference) or error text}`` for every layout and the SFT-limit check."""
    d = tmp_path_factory.mktemp("step")
    base = dict(global_batch=GLOBAL_BATCH, seq=SEQ, mbs=MBS, seed=SEED, optim=OPTIM)
    refs = {}
    for name, cfg in CONFIGS.items():
        ref = str(d / f"ref_{name}")
        refs[name] = dict(base, **cfg, ref=ref)
    by_world: dict[int, list] = {2: [dict(spec, kind="reference", id=f"reference {name}",
                                          done=os.path.join(spec["ref"], "ref.json"))
                                     for name, spec in refs.items()]}
    for run in RUNS:
        out = str(d / run.id)
        spec = dict(refs[run.config], kind="layout", id=run.id, config=run.config, out=out,
                    done=os.path.join(out, "result.json"), tp=run.tp, pp=run.pp, cp=run.cp, sp=run.sp,
                    distopt=run.distopt, **(dict(vpp=run.vpp) if run.vpp else {}))
        by_world.setdefault(run.world, []).append(spec)
    sft_out = str(d / "sft.json")
    by_world[2].append(dict(kind="sft_exact", id=SFT_EXACT, tp=2, out=sft_out, done=sft_out))
    failures: dict[str, str] = {}
    timings = {}
    for world, specs in sorted(by_world.items()):
        start = time.perf_counter()
        _launch(world, [s for s in specs if f"reference {s.get('config')}" not in failures], failures)
        timings[world] = time.perf_counter() - start
    print("launch wall seconds by world size:", {w: round(t, 1) for w, t in timings.items()})
    out = {SFT_EXACT: failures.get(SFT_EXACT) or json.load(open(sft_out))}
    for run in RUNS:
        name, rid = run.config, run.id
        if f"reference {name}" in failures:
            out[rid] = f"the reference of {name!r} failed:\n{failures[f'reference {name}']}"
        elif rid in failures:
            out[rid] = failures[rid]
        else:
            ref = json.load(open(d / f"ref_{name}" / "ref.json"))
            out[rid] = (json.load(open(d / rid / "result.json")), ref)
    return out


def _outcome(results, rid):
    got = results[rid]
    if isinstance(got, str):
        pytest.fail(got, pytrace=False)
    return got


@pytest.mark.dist
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.id)
def test_step_matches_single_process_reference(results, run):
    result, ref = _outcome(results, run.id)
    distopt = run.distopt
    assert result["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for key in ("loss_sft", "loss_mixed_sft", "weight_max", "weight_entropy", "num_samples"):
        assert result["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-7), key
    if not distopt:  # with ZeRO each rank holds only its shard of the gradients
        assert result["grads"], "no gradients compared"
        for name, (diff, scale) in result["grads"].items():
            assert diff <= 1e-5 * scale + 1e-12, f"grad {name}: {diff} vs scale {scale}"
    assert result["params"]
    for name, (diff, scale) in result["params"].items():
        assert diff <= 1e-5 * scale + 0.01 * OPTIM["lr"], f"param {name}: {diff} vs scale {scale}"


@pytest.mark.dist
@pytest.mark.timeout(1500)
def test_sft_limit_equals_megatron_sft(results):
    """lambda = 0, gamma = 0: the loss and gradients of megatron-core's own cross-entropy SFT
    step through the same schedule, at TP 2, to float32 rounding (1e-6 loss, 1e-5 gradients
    relative to each tensor's largest entry). Not bit for bit: the step's output layer runs on
    the trained positions only, fused with the log-probs, so its GEMMs sum in another order.
    (Run in the 2-process launch of the layout matrix.)"""
    r = _outcome(results, SFT_EXACT)
    assert r["ours"] == pytest.approx(r["megatron"], rel=1e-6)
    assert r["grad_rel_err"] <= 1e-5 and r["max_grad"] > 0
