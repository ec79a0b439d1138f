"""IFT step time and peak memory relative to SFT, on the same model and batch, in one run.

Timing: IFT and SFT steps alternate in one process (same weights, same micro-batches), so
machine noise hits both equally; the ratio of medians is reported. Memory: each mode runs in a
fresh child process and reports its peak (CUDA: max allocated; CPU: peak RSS), so neither
mode's allocations hide the other's.

    python benchmarks/ift_vs_sft.py --out benchmarks/results/ift_vs_sft_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG_KEYS = ("layers", "hidden", "heads", "vocab", "seq", "mbs", "microbatches", "dtype", "warmup",
                "steps", "prompt_fraction")
sys.path.insert(0, ROOT)

from _report import cpu_description, write_result  # noqa: E402  (benchmarks/, the script's folder)


def _setup(args):
    from megatron_ift.platform import bootstrap

    platform = bootstrap()
    import torch

    from megatron_ift.data.batch import Batch
    from megatron_ift.distributed import init_distributed, model_parallel_seed
    from megatron_ift.models.config import ModelConfig
    from megatron_ift.parallel import ParallelConfig
    from megatron_ift.training.engine import OptimizerConfig, build_model, build_optimizer

    par = ParallelConfig(use_distributed_optimizer=False)
    init_distributed(par, platform)
    model_parallel_seed(1, platform)
    model = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=max(1, args.heads // 2), ffn_hidden_size=args.hidden * 3,
        vocab_size=args.vocab, max_position_embeddings=args.seq,
        params_dtype=args.dtype, transformer_impl="local",
    )
    chunks, tcfg = build_model(model, par, platform)
    opt = build_optimizer(chunks, OptimizerConfig(lr=1e-4), model, par, tcfg)
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(args.microbatches):
        tokens = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=g)
        mask = torch.ones(args.mbs, args.seq)
        mask[:, : int(args.seq * args.prompt_fraction)] = 0  # the prompt: no loss, no estimate
        mbs.append(Batch(  # host batches, as the loader gives them (the step moves them)
            tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=mask,
            position_ids=torch.arange(args.seq).repeat(args.mbs, 1),
            sample_ids=torch.arange(args.mbs),
        ))
    return platform, model, chunks, opt, mbs


def _steppers(args, platform, model, chunks):
    from megatron_ift.ift import IFTConfig
    from megatron_ift.training.step import IFTStep

    kw = dict(seq_length=args.seq, micro_batch_size=args.mbs, platform=platform)
    return {
        "ift": IFTStep(chunks, IFTConfig(max_lambda=0.2, gamma=0.95), model.vocab_size, **kw),
        "sft": IFTStep(chunks, IFTConfig(max_lambda=0.0, gamma=0.0), model.vocab_size, **kw),
    }


def _one(platform, step, chunks, opt, mbs, i, forward_only=False):
    import torch

    for c in chunks:
        c.zero_grad_buffer()
    opt.zero_grad()
    if platform.real_cuda:
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    step(mbs, i, forward_only=forward_only)
    if not forward_only:
        opt.step()
    if platform.real_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def run_timing(args) -> dict:
    platform, model, chunks, opt, mbs = _setup(args)
    steppers = _steppers(args, platform, model, chunks)
    # "forward": the SFT step forward-only (one forward and the loss, no backward, no optimizer),
    # the F of the method's floor (F + F + B) / (F + B) = 1 + F / SFT step.
    wall = {"ift": [], "sft": [], "forward": []}
    cpu = {"ift": [], "sft": [], "forward": []}
    for i in range(args.warmup + args.steps):
        order = ("ift", "sft", "forward") if i % 2 == 0 else ("forward", "sft", "ift")
        for mode in order:
            step = steppers["sft" if mode == "forward" else mode]
            dt, ct = _one(platform, step, chunks, opt, mbs, i, forward_only=mode == "forward")
            if i >= args.warmup:
                wall[mode].append(dt)
                cpu[mode].append(ct)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    device = platform.describe() if platform.cuda else cpu_description()
    return {"device": device, "median_step_s": med, "all_step_s": wall, "ratio": med["ift"] / med["sft"],
            "median_cpu_s": cmed, "cpu_ratio": cmed["ift"] / cmed["sft"],
            "floor": 1.0 + med["forward"] / med["sft"]}


def run_memory(args) -> dict:
    import torch

    platform, model, chunks, opt, mbs = _setup(args)
    step = _steppers(args, platform, model, chunks)[args.mode]
    if platform.real_cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(3):
        _one(platform, step, chunks, opt, mbs, i)
    kind = "cuda max_memory_allocated" if platform.real_cuda else "peak RSS"
    return {"peak_bytes": platform.peak_memory_gb() * 2**30, "kind": kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-fraction", type=float, default=0.25,
                   help="leading share of every sample that is prompt (loss_mask 0)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=None)
    p.add_argument("--mode", choices=["timing", "memory-ift", "memory-sft", "all"], default="all")
    args = p.parse_args(argv)

    if args.mode.startswith("memory-"):
        args.mode = args.mode.split("-")[1]
        print(json.dumps(run_memory(args)))
        return 0
    if args.mode == "timing":
        print(json.dumps(run_timing(args)))
        return 0

    base = [sys.executable, os.path.abspath(__file__)] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _CONFIG_KEYS
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    def child(mode):
        out = subprocess.run(base + [f"--mode={mode}"], capture_output=True, text=True, env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    timing = child("timing")
    mem = {m: child(f"memory-{m}") for m in ("sft", "ift")}
    import torch

    result = {
        "benchmark": "ift_vs_sft",
        "device": timing["device"],
        "torch": torch.__version__,
        "config": {k: getattr(args, k) for k in _CONFIG_KEYS},
        "step_time_ratio_ift_over_sft": timing["ratio"],
        # The method's floor measured in the same run: 1 + (SFT forward-only) / (SFT step).
        "step_time_floor_1_plus_forward_over_sft": timing["floor"],
        "answer_fraction": 1.0 - args.prompt_fraction,
        "median_step_s": timing["median_step_s"],
        # Process CPU time (all threads): robust when other jobs share the machine; the
        # figure to read on a shared CPU host. On GPU the wall-clock ratio is the one.
        "cpu_time_ratio_ift_over_sft": timing["cpu_ratio"],
        "median_cpu_s": timing["median_cpu_s"],
        "load_average_1m_at_end": os.getloadavg()[0],
        "peak_memory_bytes": {m: mem[m]["peak_bytes"] for m in mem},
        "peak_memory_kind": mem["sft"]["kind"],
        "peak_memory_ratio_ift_over_sft": mem["ift"]["peak_bytes"] / mem["sft"]["peak_bytes"],
        "targets": {"step_time_ratio_max": 1.36, "memory_ratio_max": 1.05},
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
