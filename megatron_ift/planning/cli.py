"""``megatron-ift plan``: per-GPU memory and ranked TP/CP/PP/DP/VPP layouts for a cluster.

    megatron-ift plan --preset llama3-70b --nodes 8 --gpus-per-node 8 --seq-length 4096
    megatron-ift plan --config configs/my_model.yaml --nodes 1 --json

``--config`` reads the ``model:`` section of a training config. ``tools/plan.py`` is the same
command. See docs/scale_out.md. Exit status: 0 a layout fits, 1 none fits, 2 a bad option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

from megatron_ift.config_io import load_yaml
from megatron_ift.errors import run_cli
from megatron_ift.models.config import ModelConfig
from megatron_ift.planning import PRESETS, Cluster, Workload, get_preset, plan, render, to_dict
from megatron_ift.validation import ConfigError


def _model(args: argparse.Namespace) -> tuple[str, ModelConfig]:
    if args.config:
        section = load_yaml(args.config).get("model")  # refuses a file that is not a mapping
        if not isinstance(section, dict):
            raise ConfigError(f"{args.config} has no `model:` section")
        return args.config, ModelConfig.from_dict(section)
    return args.preset, get_preset(args.preset)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the planner; returns the exit status (0 a layout fits, 1 none fits, 2 refused)."""
    return run_cli("megatron-ift plan", _plan, list(sys.argv[1:] if argv is None else argv))


def _plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-ift plan", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    source.add_argument("--config", help="training YAML whose `model:` section is the model")
    defaults = Cluster(nodes=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--gpu-memory-gib", type=float, default=defaults.gpu_memory_gib)
    parser.add_argument("--reserved-gib", type=float, default=defaults.reserved_gib)
    parser.add_argument("--headroom", type=float, default=defaults.headroom,
                        help="fraction of GPU memory a plan leaves free")
    parser.add_argument("--intra-node-gbps", type=float, default=defaults.intra_node_gbps)
    parser.add_argument("--inter-node-gbps", type=float, default=defaults.inter_node_gbps)
    wl = Workload()
    parser.add_argument("--seq-length", type=int, default=wl.seq_length)
    parser.add_argument("--micro-batch-size", type=int, default=wl.micro_batch_size)
    parser.add_argument("--global-batch-size", type=int, default=wl.global_batch_size)
    parser.add_argument("--sft", action="store_true", help="plan plain SFT (no estimation pass)")
    parser.add_argument("--logits-chunk-tokens", type=int, default=None)
    parser.add_argument("--bf16-grads", action="store_true",
                        help="bf16 gradient buffer instead of fp32")
    parser.add_argument("--implementation", choices=["transformer_engine", "local"],
                        default=wl.implementation)
    parser.add_argument("--max-cp", type=int, default=wl.max_cp,
                        help="largest context-parallel size to consider (1: none)")
    parser.add_argument("--min-cp-rank-tokens", type=int, default=wl.min_cp_rank_tokens,
                        help="consider CP only while each rank keeps this many tokens of a row")
    parser.add_argument("--top", type=int, default=10, help="layouts to list")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        name, model = _model(args)
        cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          gpu_memory_gib=args.gpu_memory_gib, reserved_gib=args.reserved_gib,
                          headroom=args.headroom,
                          intra_node_gbps=args.intra_node_gbps,
                          inter_node_gbps=args.inter_node_gbps)
        workload = Workload(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                            global_batch_size=args.global_batch_size, ift=not args.sft,
                            logits_chunk_tokens=args.logits_chunk_tokens,
                            grad_reduce_in_fp32=not args.bf16_grads,
                            implementation=args.implementation, max_cp=args.max_cp,
                            min_cp_rank_tokens=args.min_cp_rank_tokens)
        result = plan(model, cluster, workload)
    except (OSError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc
    if args.json:
        data = to_dict(result, top=args.top)
        data["model"] = {"name": name, **dataclasses.asdict(model)}
        print(json.dumps(data, indent=2))
    else:
        print(render(result, name, top=args.top))
    return 0 if result.best else 1


if __name__ == "__main__":
    sys.exit(main())
