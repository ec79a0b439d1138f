"""Worker: the planner's byte counts against real megatron-core objects built on the CPU.

Run under torchrun with 2 processes (gloo). For each case it initialises megatron-core's groups
for a layout, builds the GPT chunks, megatron DDP and the megatron optimizer, takes one optimizer
step (Adam allocates its moments lazily) and compares, on every rank:

* parameter names and shapes with :func:`chunk_parameters`;
* bytes of distinct parameter storages, gradient (``main_grad``) storages, fp32 master copies and
  Adam moments with :func:`state_memory`: exactly (under context parallelism over the data x
  context parallel ranks, as the planner sizes it);
* bytes of distinct tensors autograd saves during one forward (``saved_tensors_hooks``) with
  :func:`saved_bytes` for the local spec: exactly.

Prints one ``CASE <name> OK ...`` line per case and ``ALL <n> CASES OK`` on rank 0; raises on
the first mismatch (every rank checks its own stage and shard). ``PLAN_MEMORY_DEBUG=1`` prints
every saved storage and the planned terms.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

from megatron_ift.platform import bootstrap  # noqa: E402

PLATFORM = bootstrap()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402

from megatron_ift.models.config import ModelConfig  # noqa: E402
from megatron_ift.models.gpt import build_gpt_chunks, transformer_config  # noqa: E402
from megatron_ift.ift.context_parallel import local_positions  # noqa: E402
from megatron_ift.distributed import destroy_distributed, init_distributed, model_parallel_seed  # noqa: E402
from megatron_ift.parallel import ParallelConfig  # noqa: E402
from megatron_ift.planning.activations import MicroBatch, layer_terms, saved_bytes  # noqa: E402
from megatron_ift.planning.params import chunk_layers, chunk_parameters, state_memory  # noqa: E402

# Awkward sizes on purpose: 48-wide norms and 12-wide heads are not multiples of 64, so DDP's
# per-parameter alignment padding and the bucket-end padding both show up in the counts.
BASE = dict(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=72, vocab_size=1000, max_position_embeddings=64)

#: name -> (layout, model overrides, DDP/optimizer settings). World size is 2.
CASES = {
    "dp2 bf16 distopt": (dict(), dict(), dict()),
    "tp2 sp bf16 distopt": (dict(tensor_model_parallel_size=2, sequence_parallel=True), dict(),
                            dict()),
    "tp2 sp gpt2-style": (dict(tensor_model_parallel_size=2, sequence_parallel=True),
                          dict(normalization="LayerNorm", activation="gelu",
                               add_bias_linear=True), dict()),
    "pp2 bf16 distopt": (dict(pipeline_model_parallel_size=2), dict(), dict()),
    "pp2 vpp2 bf16": (dict(pipeline_model_parallel_size=2,
                           virtual_pipeline_model_parallel_size=2), dict(), dict()),
    "pp2 tied embeddings": (dict(pipeline_model_parallel_size=2), dict(tie_embeddings=True),
                            dict()),
    "dp2 small buckets bf16 grads": (dict(), dict(),
                                     dict(bucket_size=3000, grad_reduce_in_fp32=False)),
    "dp2 fp32 params": (dict(), dict(params_dtype="float32"), dict()),
    "dp2 no distopt": (dict(use_distributed_optimizer=False), dict(), dict()),
    # Context parallelism 2 (DP 1): megatron-core's DDP buffers and distributed optimizer work
    # over the data x context parallel group, so the two CP ranks split the optimizer state.
    "cp2 bf16 distopt": (dict(context_parallel_size=2), dict(), dict()),
}


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _patch_recompute_rng() -> None:
    """megatron-core's activation checkpointing saves CUDA RNG state; give it the CPU's.

    cpu_compat does not cover recomputation yet; forward-only measurement needs just this.
    """
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *a, **k: None


def check_state(name: str, layout: dict, model_kw: dict, opt_kw: dict) -> str:
    par = ParallelConfig(**layout)
    model = ModelConfig(**BASE, params_dtype=model_kw.pop("params_dtype", "bfloat16"), **model_kw)
    init_distributed(par, PLATFORM)
    model_parallel_seed(1234, PLATFORM)
    tp, pp, vpp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.vpp
    # The planner sizes the state for DP x CP ranks (planner.stage_memory): this process's place
    # in megatron-core's data x context parallel group.
    dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    bucket_size = opt_kw.get("bucket_size")
    grad_fp32 = opt_kw.get("grad_reduce_in_fp32", True)

    config = transformer_config(model, par, PLATFORM)
    chunks = build_gpt_chunks(model, par, PLATFORM, config)
    for vp_stage, chunk in enumerate(chunks):
        got = [(n, tuple(p.shape)) for n, p in chunk.named_parameters()]
        want = [(p.name, p.shape) for p in chunk_parameters(model, tp=tp, pp=pp, vpp=vpp,
                                                            pp_rank=pp_rank, vp_stage=vp_stage)]
        assert got == want, f"{name}: parameters differ on chunk {vp_stage}:\n{got}\n{want}"

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_fp32, use_distributed_optimizer=par.use_distributed_optimizer,
        overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    bf16 = model.params_dtype == "bfloat16"
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=bf16,
                        params_dtype=torch.bfloat16 if bf16 else torch.float32,
                        use_distributed_optimizer=par.use_distributed_optimizer),
        wrapped)
    for module in wrapped:
        for p in module.parameters():
            p.main_grad.fill_(1e-3)
    optimizer.step()

    params = list(p for m in wrapped for p in m.parameters())
    param_storages = _storages(params)
    grad_storages = _storages(p.main_grad for p in params)
    master, moments = {}, {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = opt.optimizer
        for group in torch_opt.param_groups:
            for main in group["params"]:
                ptr = main.untyped_storage().data_ptr()
                if ptr not in param_storages:  # fp32 models' main params are views of the model
                    master[ptr] = main.untyped_storage().nbytes()
                state = torch_opt.state[main]
                moments.update(_storages(state[k] for k in ("exp_avg", "exp_avg_sq")))
    measured = dict(params=sum(param_storages.values()), grads=sum(grad_storages.values()),
                    master_params=sum(master.values()), adam_moments=sum(moments.values()))
    planned = state_memory(model, tp=tp, pp=pp, dp=dp, vpp=vpp, pp_rank=pp_rank,
                           dp_rank=dp_rank, grad_reduce_in_fp32=grad_fp32,
                           distributed_optimizer=par.use_distributed_optimizer,
                           bucket_size=bucket_size)
    for key, value in measured.items():
        assert getattr(planned, key) == value, (
            f"{name} (pp rank {pp_rank}, dp rank {dp_rank}): {key} measured {value} B, "
            f"planned {getattr(planned, key)} B")
    parallel_state.destroy_model_parallel()  # keep the process group for the next case
    return f"params={measured['params']} grads={measured['grads']} " \
           f"master={measured['master_params']} moments={measured['adam_moments']}"


#: name -> (layout, recompute, seq, micro-batch). Activations are checked per rank, pp = 1.
ACTIVATION_CASES = {
    "acts tp2 sp none": (dict(tensor_model_parallel_size=2, sequence_parallel=True), "none", 16, 2),
    "acts tp2 sp selective": (dict(tensor_model_parallel_size=2, sequence_parallel=True),
                              "selective", 16, 2),
    "acts tp2 sp full": (dict(tensor_model_parallel_size=2, sequence_parallel=True), "full", 16, 2),
    "acts tp2 no sp": (dict(tensor_model_parallel_size=2), "none", 24, 1),
    "acts dp2 mha": (dict(), "none", 16, 3),
    # megatron-core's unfused DotProductAttention (model.attention_backend=local); the cases
    # above run the default fused SDPA core attention.
    "acts tp2 sp none unfused": (dict(tensor_model_parallel_size=2, sequence_parallel=True),
                                 "none", 16, 2),
    "acts dp2 mha unfused": (dict(), "none", 16, 3),
    # context parallelism: each rank holds s / 2 tokens, its attention the all-gathered keys and
    # values of the whole rows
    "acts cp2 none": (dict(context_parallel_size=2), "none", 16, 2),
    "acts cp2 mha selective": (dict(context_parallel_size=2), "selective", 24, 1),
    "acts cp2 full": (dict(context_parallel_size=2), "full", 16, 2),
}


def check_activations(name: str, layout: dict, recompute: str, seq: int, mbs: int,
                      mha: bool) -> str:
    par = ParallelConfig(**layout)
    kw = dict(BASE, num_query_groups=4) if mha else BASE
    model = ModelConfig(**kw, params_dtype="bfloat16",
                        attention_backend="local" if name.endswith("unfused") else "auto")
    init_distributed(par, PLATFORM)
    model_parallel_seed(1234, PLATFORM)
    extra = {}
    if recompute == "full":
        extra = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    elif recompute == "selective":
        extra = dict(recompute_granularity="selective")
    config = transformer_config(model, par, PLATFORM, **extra)
    (chunk,) = build_gpt_chunks(model, par, PLATFORM, config)
    chunk.train()
    params = _storages(chunk.parameters())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            if os.environ.get("PLAN_MEMORY_DEBUG") and storage.data_ptr() not in saved:
                print(f"rank {parallel_state.get_data_parallel_rank(with_context_parallel=True)} "
                      f"saves {storage.nbytes()} B {tuple(t.shape)} {t.dtype}", file=sys.stderr)
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    # The same tokens on both tensor-parallel ranks (megatron-core expects that).
    # With context parallelism each rank's share of the rows (its two chunks).
    cp = par.context_parallel_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (mbs, seq // cp), generator=gen)
    position_ids = local_positions(seq, parallel_state.get_context_parallel_rank(), cp).repeat(mbs, 1) \
        if cp > 1 else torch.arange(seq).repeat(mbs, 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunk(ids, position_ids, None, labels=ids)
    tp = par.tensor_model_parallel_size
    mb = MicroBatch(seq_length=seq, micro_batch_size=mbs, tp=tp, cp=cp,
                    sequence_parallel=par.sequence_parallel, implementation="local")
    planned = saved_bytes(model, mb, num_layers=chunk_layers(model.num_layers, 1, 1), first=True,
                          last=True, recompute=recompute)
    measured = sum(saved.values())
    if cp > 1 and parallel_state.get_context_parallel_rank() == 0 and recompute == "none":
        # CP rank 0's first chunk is plain causal: one mask fewer (the planner counts the other
        # ranks, which have both)
        c = seq // (2 * cp)
        planned -= c * c * 2
    if os.environ.get("PLAN_MEMORY_DEBUG"):  # what to compare when a case fails
        print(name, "planned layer terms:", layer_terms(model, mb, recompute), file=sys.stderr)
    assert measured == planned, f"{name}: saved activations measured {measured} B, planned {planned} B"
    del loss  # no backward: recomputation's backward needs CUDA (cpu_compat does not cover it)
    parallel_state.destroy_model_parallel()
    return f"saved={measured}"


def main(argv: list[str]) -> int:
    _patch_recompute_rng()
    selected = set(argv) or set(CASES) | set(ACTIVATION_CASES)
    import torch.distributed as dist

    for name, (layout, model_kw, opt_kw) in CASES.items():
        if name in selected:
            start = time.monotonic()
            detail = check_state(name, dict(layout), dict(model_kw), dict(opt_kw))
            if dist.get_rank() == 0:
                print(f"CASE {name} OK {detail} ({time.monotonic() - start:.1f} s)", flush=True)
    for name, (layout, recompute, seq, mbs) in ACTIVATION_CASES.items():
        if name in selected:
            detail = check_activations(name, dict(layout), recompute, seq, mbs,
                                       mha=" mha" in name)
            if dist.get_rank() == 0:
                print(f"CASE {name} OK {detail}", flush=True)
    if dist.get_rank() == 0:
        print(f"ALL {len(selected)} CASES OK", flush=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
