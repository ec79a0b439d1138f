"""Context parallelism at a long sequence: per-rank peak memory and step time at CP 1, 2 and 4.

One torchrun per CP size (world = CP, so every other parallel size is 1) trains the same model on
the same rows (unpacked, a prompt share without loss). Per rank and step mode (IFT, SFT):

* step time: median wall seconds of alternating IFT and SFT steps (each with its optimizer step);
* memory: the rise of the resident set during one step above what the process held before it
  (Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` after a warm-up step, so weights,
  gradient buffers and Adam moments, allocated before, do not count; glibc's mmap threshold
  fixed, so freed blocks leave the resident set): the step's activations and working memory;
* the planner's saved-activation bytes for the same micro-batch at that CP size
  (:func:`megatron_ift.planning.activations.saved_bytes`, ``local`` implementation, the
  megatron-core SFT forward it models), to set the measurement beside, and the CPU path's
  cached causal masks of the CP chunks (:func:`~megatron_ift.planning.activations.cp_mask_bytes`:
  allocated once, in the warm-up step, so not part of a measured step's rise).

    python benchmarks/context_parallel.py --seq 16384 --out benchmarks/results/context_parallel_cpu.json

On a CPU host with fewer cores than ranks the step times are oversubscribed (reported: cores,
threads per rank); the memory figures do not depend on that.
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
sys.path.insert(0, ROOT)

from _report import cpu_description, write_result  # noqa: E402  (benchmarks/, the script's folder)
_MODEL_KEYS = ("layers", "hidden", "heads", "groups", "vocab", "seq", "prompt_fraction", "steps")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def worker(args) -> None:
    from megatron_ift.platform import bootstrap

    platform = bootstrap()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ift.data.batch import Batch
    from megatron_ift.distributed import init_distributed, model_parallel_seed
    from megatron_ift.ift import IFTConfig
    from megatron_ift.models.config import ModelConfig
    from megatron_ift.parallel import ParallelConfig
    from megatron_ift.planning.activations import MicroBatch, cp_mask_bytes, saved_bytes
    from megatron_ift.training.engine import OptimizerConfig, build_model, build_optimizer
    from megatron_ift.training.step import IFTStep

    cp = int(os.environ.get("WORLD_SIZE", "1"))
    par = ParallelConfig(context_parallel_size=cp, use_distributed_optimizer=False)
    init_distributed(par, platform)
    model_parallel_seed(1, platform)
    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                        num_query_groups=args.groups, ffn_hidden_size=3 * args.hidden,
                        vocab_size=args.vocab, max_position_embeddings=args.seq,
                        params_dtype="float32", transformer_impl="local")
    chunks, tcfg = build_model(model, par, platform)
    opt = build_optimizer(chunks, OptimizerConfig(lr=1e-4), model, par, tcfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (1, args.seq + 1), generator=g)
    mask = torch.ones(1, args.seq)
    mask[:, : int(args.seq * args.prompt_fraction)] = 0
    batch = [Batch(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=mask,
                   position_ids=torch.arange(args.seq)[None], sample_ids=torch.arange(1))]
    kw = dict(seq_length=args.seq, micro_batch_size=1, platform=platform)
    steps = {"ift": IFTStep(chunks, IFTConfig(max_lambda=0.2, gamma=0.95), model.vocab_size, **kw),
             "sft": IFTStep(chunks, IFTConfig(max_lambda=0.0, gamma=0.0), model.vocab_size, **kw)}

    def one(mode: str, i: int) -> tuple[float, int, float]:
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        dist.barrier()
        _reset_peak()
        before = _rss_bytes("VmRSS")
        start = time.perf_counter()
        loss = steps[mode](batch, i).loss
        opt.step()
        dist.barrier()
        return time.perf_counter() - start, _rss_bytes("VmHWM") - before, loss

    for mode in ("ift", "sft"):  # warm-up: Adam's moments, allocator pools
        one(mode, 0)
    times: dict[str, list[float]] = {"ift": [], "sft": []}
    peaks: dict[str, list[int]] = {"ift": [], "sft": []}
    losses: dict[str, list[float]] = {"ift": [], "sft": []}
    for i in range(1, args.steps + 1):
        for mode in (("ift", "sft") if i % 2 else ("sft", "ift")):
            dt, peak, loss = one(mode, i)
            times[mode].append(dt)
            peaks[mode].append(peak)
            losses[mode].append(loss)
    mb = MicroBatch(seq_length=args.seq, micro_batch_size=1, cp=cp, implementation="local")
    mine = {"rank": dist.get_rank(), "cp_rank": parallel_state.get_context_parallel_rank(),
            "median_step_s": {m: statistics.median(v) for m, v in times.items()},
            "step_peak_rss_rise_bytes": {m: max(v) for m, v in peaks.items()},
            "planned_saved_activation_bytes": saved_bytes(model, mb, num_layers=args.layers,
                                                          first=True, last=True, shared=False),
            "planned_cached_cp_mask_bytes": cp_mask_bytes(model, mb),
            "losses": losses}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"cp": cp, "ranks": ranks}), flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--prompt-fraction", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    runs = []
    for cp in args.cp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp),
               "--master-port", str(29650 + cp), os.path.abspath(__file__), "--worker"] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _MODEL_KEYS]
        # A fixed mmap threshold: glibc returns every large freed block to the system at once
        # (its default raises the threshold after a free, keeping later blocks in the heap, so
        # a step after the warm-up would show no rise at all).
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
                   MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"CP {cp} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        runs.append(json.loads(line[len("RESULT "):]))
        print(f"CP {cp}: done", file=sys.stderr)

    import torch

    def worst(run, key, mode):
        return max(r[key][mode] for r in run["ranks"])

    base = runs[0]
    summary = []
    for run in runs:
        summary.append({
            "cp": run["cp"],
            "ift_step_s": worst(run, "median_step_s", "ift"),
            "sft_step_s": worst(run, "median_step_s", "sft"),
            "ift_over_sft_step_time": worst(run, "median_step_s", "ift") / worst(run, "median_step_s", "sft"),
            "ift_peak_rss_rise_per_rank_bytes": worst(run, "step_peak_rss_rise_bytes", "ift"),
            "sft_peak_rss_rise_per_rank_bytes": worst(run, "step_peak_rss_rise_bytes", "sft"),
            "ift_memory_vs_cp1": worst(run, "step_peak_rss_rise_bytes", "ift")
            / worst(base, "step_peak_rss_rise_bytes", "ift"),
            "planned_saved_activation_bytes_per_rank": max(r["planned_saved_activation_bytes"] for r in run["ranks"]),
            "planned_cached_cp_mask_bytes_per_rank": max(r["planned_cached_cp_mask_bytes"] for r in run["ranks"]),
            "ift_losses_equal_cp1": all(
                abs(a - b) <= 1e-5 * abs(b) for a, b in zip(run["ranks"][0]["losses"]["ift"],
                                                             base["ranks"][0]["losses"]["ift"])),
        })
    result = {
        "benchmark": "context_parallel",
        "device": f"{cpu_description()}, one thread per rank",
        "torch": torch.__version__,
        "config": {k: getattr(args, k) for k in _MODEL_KEYS},
        "memory_kind": "rise of the resident set during one step above the set before it (VmHWM)",
        "summary": summary,
        "runs": runs,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
