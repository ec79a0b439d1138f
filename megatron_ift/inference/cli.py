"""``megatron-ift generate CHECKPOINT``: chat with a run or an imported checkpoint.

One process (TP1/PP1), or under torchrun at any TP x PP (the world size must equal TP x PP)::

    megatron-ift generate runs/smollm2_135m_ift --prompt "What is 2 + 3?"
    torchrun --nproc-per-node 6 -m megatron_ift.inference.cli runs/smollm2_135m_ift --tp 3 --pp 2 \\
        --prompt "What is 2 + 3?" --temperature 0.7 --top-p 0.9

Prompts are user messages wrapped in the tokenizer's chat template (``--raw``: plain text).
Without ``--prompt``/``--prompts-file`` in one process it reads prompts interactively and keeps
the conversation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from megatron_ift.errors import ConfigError, run_cli
from megatron_ift.inference.sampling import SamplingConfig
from megatron_ift.platform import bootstrap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-ift generate",
        description="Generate from a megatron-ift run directory or imported checkpoint (any "
        "TP/PP layout; megatron-core's KV cache). Greedy by default; sampling with "
        "--temperature/--top-p. Each answer stops at the tokenizer's EOS.",
    )
    p.add_argument("checkpoint", help="run directory, iter_* folder or import-hf output")
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    p.add_argument("--prompts-file", default=None,
                   help="jsonl: one {\"messages\": [...]} or {\"prompt\": \"...\"} per line")
    p.add_argument("--system", default=None, help="system message put before each prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: prompts are plain text")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: found from the checkpoint)")
    p.add_argument("--output", default=None,
                   help="write {prompt, response, tokens} per line to this jsonl file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _conversations(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    convs = [[{"role": "user", "content": text}] for text in args.prompt]
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise ConfigError(f"--prompts-file {args.prompts_file} does not exist")
        with open(args.prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{args.prompts_file}:{n} is not valid JSON ({exc})") from None
                if "messages" in row:
                    convs.append(list(row["messages"]))
                elif "prompt" in row:
                    convs.append([{"role": "user", "content": row["prompt"]}])
                else:
                    raise ConfigError(f"{args.prompts_file}:{n} has neither 'messages' nor "
                                      "'prompt'")
    if args.system:
        convs = [[{"role": "system", "content": args.system}] + c for c in convs]
    return convs


def encode(tokenizer: Any, conversation: list[dict[str, str]], raw: bool,
           tokenizer_dir: str) -> list[int]:
    """Token ids of one prompt: chat template with the assistant's turn opened, or raw text.

    Raises:
        ConfigError: the tokenizer has no chat template (and ``raw`` is off).
    """
    if raw:
        return tokenizer("\n".join(m["content"] for m in conversation),
                         add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the tokenizer in {tokenizer_dir} has no chat template "
                          "(chat_template.jinja or tokenizer_config.json); pass --raw, or "
                          "--tokenizer a folder with one")
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, load, generate, print.

    Returns:
        The exit status: 0, or a refusal's code printed as one line (2 configuration, 4
        checkpoint; ``megatron_ift.errors``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli("megatron-ift generate", _generate, argv)


def _generate(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.tp * args.pp != world:
        raise ConfigError(
            f"--tp {args.tp} x --pp {args.pp} needs {args.tp * args.pp} processes, this is "
            f"{world}; run under torchrun --nproc-per-node {args.tp * args.pp}"
        )
    convs = _conversations(args)
    if not convs and world > 1:
        raise ConfigError("interactive chat runs in one process; pass --prompt or "
                          "--prompts-file under torchrun")
    platform = bootstrap()
    # After the bootstrap: generation imports megatron-core.
    from megatron_ift.inference.chat import run

    return run(args, sampling, convs, platform)


if __name__ == "__main__":
    sys.exit(main())
