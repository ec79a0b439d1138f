"""The project's SFT and IFT steps against a plain transformers step on the same model and data.

Both stacks hold the *same* weights (a Llama model of SmolLM2-135M's shape, random weights
copied from the Hugging Face model into megatron-core's layout; the first losses are checked to
agree), the same micro-batches, float32, the same optimizer (AdamW, clip 1.0). The plain
transformers step is what a user would write: ``LlamaForCausalLM`` with SDPA attention
(packed rows through a 4-D block-causal mask: transformers 5.24 does not derive one from the
restarting ``position_ids`` here, and its logits differ without it),
full-vocabulary float32 ``log_softmax`` at every position, and for IFT a no-grad greedy pass
then a second pass on ``inputs_embeds = (1 - lambda) E[x] + lambda E[xhat]``, with the project's
own IFT loss functions (so both stacks optimise the same objective).

Timing: the four steps (project SFT / IFT, transformers SFT / IFT) are interleaved in one
process, order alternating per round, so machine noise hits all of them; medians, spread and
tokens/s are reported with the load average. Memory: each step kind runs in a fresh child
process that builds only its stack, runs two steps and reports its peak RSS (CUDA: max
allocated). Profile (``--mode profile``): one SFT
step of each stack under ``torch.profiler``, top operators by self CPU time.

    python benchmarks/vs_transformers.py --data chat --out benchmarks/results/vs_transformers_chat.json
    python benchmarks/vs_transformers.py --data all-answer --out benchmarks/results/vs_transformers_all_answer.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _report import cpu_description, write_result  # noqa: E402  (benchmarks/, the script's folder)

# SmolLM2-135M(-Instruct): the model the issue measured.
SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152,
               rope_theta=100000.0, norm_eps=1e-5)
MODES = ("mg_sft", "mg_ift", "hf_sft", "hf_ift")
_CONFIG_KEYS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq", "mbs", "data",
                "attention_backend", "warmup", "steps", "lr", "lam", "gamma")
_LOCAL_NORMS = {  # sharded (TE-style) key -> local-spec module name
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


# -- the two models ---------------------------------------------------------------------------

def hf_model(args):
    """``LlamaForCausalLM`` of the requested shape, SDPA attention, seeded random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
        rms_norm_eps=SMOLLM2["norm_eps"], rope_theta=SMOLLM2["rope_theta"],
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model.train()


def model_config(args):
    from megatron_ift.models.config import ModelConfig

    return ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq), rotary_base=SMOLLM2["rope_theta"],
        norm_epsilon=SMOLLM2["norm_eps"], tie_embeddings=True, transformer_impl="local",
        attention_backend=args.attention_backend,
    )


def megatron_model(args, hf, platform):
    """The project's TP1 model (megatron DDP + optimizer), holding ``hf``'s weights (its own
    random initialisation when ``hf`` is None: memory runs build one stack only)."""
    import torch

    from megatron_ift.checkpoint.model_io import unwrap
    from megatron_ift.convert.arch import get_architecture
    from megatron_ift.distributed import init_distributed, model_parallel_seed
    from megatron_ift.parallel import ParallelConfig
    from megatron_ift.training.engine import OptimizerConfig, build_model, build_optimizer

    par = ParallelConfig(use_distributed_optimizer=False)
    init_distributed(par, platform)
    model_parallel_seed(1, platform)
    mcfg = model_config(args)
    chunks, tcfg = build_model(mcfg, par, platform)
    opt = build_optimizer(chunks, OptimizerConfig(lr=args.lr, clip_grad=1.0, adam_beta2=0.999),
                          mcfg, par, tcfg)
    if hf is None:
        return mcfg, chunks, opt
    bare = unwrap(chunks[0])
    params = dict(bare.named_parameters())
    hf_sd = hf.state_dict()
    done = set()
    with torch.no_grad():
        for tmap, layer in get_architecture("llama").items(mcfg):
            name = tmap.megatron
            if layer is not None:
                tail = name[len("decoder.layers."):]
                name = f"decoder.layers.{layer}." + _LOCAL_NORMS.get(tail, tail)
            value = tmap.to_megatron([hf_sd[n] for n in tmap.hf_names(layer)], mcfg)
            params[name].copy_(value)
            done.add(name)
    missing = set(params) - done
    if missing:
        raise RuntimeError(f"benchmark weight copy left megatron parameters unset: {sorted(missing)}")
    return mcfg, chunks, opt


# -- data -------------------------------------------------------------------------------------

def microbatches(args) -> list:
    """``args.steps_data`` micro-batches (:class:`megatron_ift.data.batch.Batch`) of
    ``mbs x seq``: the shipped chat data packed (its real answer share), or random tokens with
    every position trained (``all-answer``, unpacked)."""
    import torch

    from megatron_ift.data.batch import Batch

    if args.data == "all-answer":
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(2):
            tokens = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=g)
            out.append(Batch(
                tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                loss_mask=torch.ones(args.mbs, args.seq),
                position_ids=torch.arange(args.seq).repeat(args.mbs, 1),
                sample_ids=torch.arange(args.mbs),
            ))
        return out
    from megatron_ift.data.config import DataConfig
    from megatron_ift.data.loader import build_data

    data = build_data(DataConfig(
        format="sft", paths=(os.path.join(ROOT, "data", "sft_messages.jsonl"),),
        tokenizer_path=os.path.join(ROOT, "data", "tokenizer"), seq_length=args.seq,
        packing=True, num_proc=1,
    ))
    it = data.train_iterator(dp_rank=0, dp_size=1, micro_batch_size=args.mbs, num_microbatches=1)
    return [next(it) for _ in range(2)]


# -- the plain transformers step --------------------------------------------------------------

def _block_causal(segment_ids):
    """Additive ``[b, 1, s, s]`` mask: causal within each packed segment, -inf elsewhere."""
    import torch

    s = segment_ids.shape[1]
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & torch.ones(
        s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return torch.zeros(allowed.shape, device=segment_ids.device).masked_fill(~allowed, float("-inf"))[:, None]


class HFStep:
    """A plain transformers SFT / IFT step (see the module docstring)."""

    def __init__(self, model, lr: float, lam: float, gamma: float):
        import torch

        from megatron_ift.ift import IFTConfig

        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        self.cfg = {"sft": IFTConfig(max_lambda=0.0, gamma=0.0),
                    "ift": IFTConfig(max_lambda=lam, gamma=gamma)}

    def __call__(self, mb, kind: str, forward_only: bool = False) -> float:
        import torch

        from megatron_ift.ift import Groups, estimated_sequence, ift_loss_terms

        cfg = self.cfg[kind]
        model, emb = self.model, self.model.get_input_embeddings()
        self.opt.zero_grad(set_to_none=True)
        pos = mb.position_ids
        mask = _block_causal(mb.segment_ids) if mb.segment_ids is not None else None
        if kind == "ift":
            with torch.no_grad():
                model.eval()
                est = model(input_ids=mb.tokens, position_ids=pos, attention_mask=mask).logits.argmax(-1)
                model.train()
            xhat = estimated_sequence(mb.tokens, est, mb.loss_mask, mb.segment_ids)
            embeds = (1 - cfg.max_lambda) * emb(mb.tokens) + cfg.max_lambda * emb(xhat)
            logits = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).logits
        else:
            logits = model(input_ids=mb.tokens, position_ids=pos, attention_mask=mask).logits
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, mb.labels[..., None])[..., 0]
        terms = ift_loss_terms(logps, mb.loss_mask, cfg, Groups.build(mb.loss_mask, mb.segment_ids))
        loss = terms.loss / terms.count.clamp(min=1)
        if not forward_only:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.opt.step()
        return float(loss)


# -- running ----------------------------------------------------------------------------------

def build(args, stacks=("mg", "hf")):
    """A ``run(mode, i, forward_only)`` closure over the requested stacks, and the data."""
    from megatron_ift.platform import bootstrap

    platform = bootstrap()
    import torch

    torch.set_num_threads(args.threads)
    hf = hf_model(args) if "hf" in stacks else None
    mg = {}
    if "mg" in stacks:
        from megatron_ift.ift import IFTConfig
        from megatron_ift.training.step import IFTStep

        mcfg, chunks, opt = megatron_model(args, hf, platform)
        kw = dict(seq_length=args.seq, micro_batch_size=args.mbs, platform=platform)
        mg = {"sft": IFTStep(chunks, IFTConfig(max_lambda=0.0, gamma=0.0), mcfg.vocab_size, **kw),
              "ift": IFTStep(chunks, IFTConfig(max_lambda=args.lam, gamma=args.gamma),
                             mcfg.vocab_size, **kw)}
    mbs = microbatches(args)
    hf_step = HFStep(hf, args.lr, args.lam, args.gamma) if hf is not None else None

    def run(mode: str, i: int, forward_only: bool = False) -> float:
        stack, kind = mode.split("_")
        mb = mbs[i % len(mbs)]
        if stack == "hf":
            return hf_step(mb, kind, forward_only)
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        out = mg[kind]([mb], i, forward_only=forward_only)
        if not forward_only:
            opt.step()
        return out.loss

    run.platform = platform
    return run, mbs


def _timed(run, mode, i):
    import torch

    if run.platform.real_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    loss = run(mode, i)
    if run.platform.real_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, loss


def run_timing(args) -> dict:
    run, mbs = build(args)
    # Same weights, same batch: the first SFT losses of both stacks agree (forward only).
    check = {m: run(m, 0, forward_only=True) for m in ("mg_sft", "hf_sft")}
    times = {m: [] for m in MODES}
    losses = {m: [] for m in MODES}
    for i in range(args.warmup + args.steps):
        order = MODES if i % 2 == 0 else MODES[::-1]
        for mode in order:
            dt, loss = _timed(run, mode, i)
            if i >= args.warmup:
                times[mode].append(dt)
                losses[mode].append(loss)
    tokens = args.mbs * args.seq
    trained = float(sum(mb.loss_mask.sum() for mb in mbs) / len(mbs))
    med = {m: statistics.median(v) for m, v in times.items()}
    platform = run.platform
    device = platform.describe() if platform.cuda else cpu_description()
    return {
        "device": device,
        "first_loss_forward_only": check,
        "median_step_s": med,
        "min_step_s": {m: min(v) for m, v in times.items()},
        "max_step_s": {m: max(v) for m, v in times.items()},
        "all_step_s": times,
        "tokens_per_s": {m: tokens / med[m] for m in MODES},
        "trained_tokens_per_step": trained,
        "answer_fraction": trained / tokens,
        "speedup_sft": med["hf_sft"] / med["mg_sft"],
        "speedup_ift": med["hf_ift"] / med["mg_ift"],
        # per-round ratios give the spread of the speed-ups under machine noise
        "speedup_sft_rounds": [h / m for h, m in zip(times["hf_sft"], times["mg_sft"])],
        "speedup_ift_rounds": [h / m for h, m in zip(times["hf_ift"], times["mg_ift"])],
        "ift_over_sft_project": med["mg_ift"] / med["mg_sft"],
        "load_average_1m_at_end": os.getloadavg()[0],
    }


def run_memory(args) -> dict:
    import torch

    run, _ = build(args, stacks=(args.mode.split("_")[0],))
    if run.platform.real_cuda:
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for i in range(2):  # the first step allocates Adam's moments; the second is steady
        run(args.mode, i)
    if run.platform.real_cuda:
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "kind": "cuda max_memory_allocated"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak, "setup_peak_bytes": base, "kind": "peak RSS"}


def run_profile(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    run, _ = build(args)
    out = {}
    for mode in ("mg_sft", "hf_sft"):
        run(mode, 0)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            run(mode, 1)
            wall = time.perf_counter() - t
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in rows)
        out[mode] = {
            "wall_s": wall,
            "self_cpu_total_s": total / 1e6,
            "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6}
                        for e in rows[: args.top]],
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=SMOLLM2["layers"])
    p.add_argument("--hidden", type=int, default=SMOLLM2["hidden"])
    p.add_argument("--heads", type=int, default=SMOLLM2["heads"])
    p.add_argument("--kv-heads", type=int, default=SMOLLM2["kv_heads"])
    p.add_argument("--ffn", type=int, default=SMOLLM2["ffn"])
    p.add_argument("--vocab", type=int, default=SMOLLM2["vocab"])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--data", choices=["chat", "all-answer"], default="chat")
    p.add_argument("--attention-backend", choices=["auto", "sdpa", "local"], default="auto")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lam", type=float, default=0.2)
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--top", type=int, default=20, help="profile: operators listed per stack")
    p.add_argument("--memory", action="store_true", help="also measure peak memory per step kind")
    p.add_argument("--out", default=None)
    p.add_argument("--mode", choices=["all", "timing", "profile", *MODES], default="all")
    args = p.parse_args(argv)

    if args.mode in MODES:
        print(json.dumps(run_memory(args)))
        return 0
    if args.mode == "timing":
        print(json.dumps(run_timing(args)))
        return 0
    if args.mode == "profile":
        result = {"benchmark": "profile_sft_step", "config": {k: getattr(args, k) for k in _CONFIG_KEYS},
                  "load_average_1m_at_end": None, **run_profile(args)}
        result["load_average_1m_at_end"] = os.getloadavg()[0]
        write_result(result, args.out)
        return 0

    base = [sys.executable, os.path.abspath(__file__), f"--threads={args.threads}"] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _CONFIG_KEYS
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    def child(mode):
        proc = subprocess.run(base + [f"--mode={mode}"], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark child {mode} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    import torch

    load_start = os.getloadavg()[0]
    timing = child("timing")
    result = {
        "benchmark": "vs_transformers",
        "torch": torch.__version__,
        "threads": args.threads,
        "config": {k: getattr(args, k) for k in _CONFIG_KEYS},
        "load_average_1m_at_start": load_start,
        **timing,
        "targets": {"speedup_sft_min": 1.25, "speedup_ift_min": 1.5},
    }
    write_result(result, args.out)  # the timing is kept even if a memory child fails
    mem = {m: child(m) for m in MODES} if args.memory else None
    if mem:
        result["peak_memory_bytes"] = {m: mem[m]["peak_bytes"] for m in MODES}
        result["peak_memory_kind"] = mem["mg_sft"]["kind"]
        result["peak_memory_ratio_project_over_hf"] = {
            k: mem[f"mg_{k}"]["peak_bytes"] / mem[f"hf_{k}"]["peak_bytes"] for k in ("sft", "ift")
        }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
