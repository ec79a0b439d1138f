"""A generation session of ``megatron-ift generate``: process groups, the model at the requested
layout, its tokenizer, then batched decoding or an interactive chat (:mod:`megatron_ift.inference.cli`
parses the arguments and bootstraps the platform first)."""

from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist

from megatron_ift.data.tokenizer import load_tokenizer
from megatron_ift.distributed import destroy_distributed, init_distributed, model_parallel_seed
from megatron_ift.inference.cli import encode
from megatron_ift.inference.decoder import KVCacheDecoder
from megatron_ift.inference.loading import find_tokenizer, load_for_inference, stop_token_ids
from megatron_ift.inference.sampling import SamplingConfig
from megatron_ift.parallel import ParallelConfig
from megatron_ift.platform import Platform


def run(args: argparse.Namespace, sampling: SamplingConfig, convs: list[list[dict[str, str]]],
        platform: Platform) -> int:
    """Load ``args.checkpoint`` at ``--tp`` x ``--pp`` and answer ``convs`` (interactively when
    empty); the process groups are torn down on every exit path.

    Returns:
        The exit status (0).
    """
    try:
        return _generate(args, sampling, convs, platform)
    finally:
        destroy_distributed()


def _generate(args: argparse.Namespace, sampling: SamplingConfig, convs: list[list[dict[str, str]]],
              platform: Platform) -> int:
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp,
                              pipeline_model_parallel_size=args.pp)
    init_distributed(parallel, platform)
    model_parallel_seed(args.seed, platform)
    model, cfg, ckpt = load_for_inference(args.checkpoint, parallel, platform)
    tokenizer_dir = find_tokenizer(ckpt, args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    stops = stop_token_ids(tokenizer, tokenizer_dir)
    decoder = KVCacheDecoder(model, cfg, platform, progress=not args.no_progress)
    rank0 = dist.get_rank() == 0

    if not convs:  # interactive, one process
        history: list[dict[str, str]] = [{"role": "system", "content": args.system}] \
            if args.system else []
        print(f"chatting with {ckpt} (empty line or Ctrl-D ends)")
        for line in sys.stdin:
            if not line.strip():
                break
            history.append({"role": "user", "content": line.strip()})
            (new,) = decoder.generate([encode(tokenizer, history, args.raw, tokenizer_dir)],
                                      sampling, stops)
            answer = tokenizer.decode(new, skip_special_tokens=True)
            history.append({"role": "assistant", "content": answer})
            print(answer, flush=True)
        return 0

    prompts = [encode(tokenizer, c, args.raw, tokenizer_dir) for c in convs]
    outputs = decoder.generate(prompts, sampling, stops)
    if rank0:
        records = [{"messages": c, "response": tokenizer.decode(o, skip_special_tokens=True),
                    "tokens": o, "prompt_tokens": len(p)}
                   for c, p, o in zip(convs, prompts, outputs)]
        for r in records:
            print(f"user: {r['messages'][-1]['content']}\nassistant: {r['response']}\n", flush=True)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
    return 0
