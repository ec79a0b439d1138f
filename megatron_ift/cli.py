"""``megatron-ift <command>``: train, convert, preprocess, plan.

Every command reports a refusal as one line on stderr with its own exit code (2 configuration,
3 data, 4 checkpoint, 5 conversion, 6 training stopped; ``docs/errors.md``); ``--debug`` (before
or after the command) or ``MEGATRON_IFT_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Sequence

COMMANDS = {
    "train": ("megatron_ift.train", "train a model (IFT or SFT) from a YAML config"),
    "convert": ("megatron_ift.convert.cli", "Hugging Face <-> Megatron checkpoint conversion"),
    "preprocess": ("megatron_ift.data.preprocess", "jsonl text -> Megatron indexed .bin/.idx"),
    "generate": ("megatron_ift.inference.cli", "chat with / generate from a checkpoint (any TP/PP)"),
    "plan": ("megatron_ift.planning.cli", "memory and parallel-layout planner"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0] == "--debug":
        os.environ["MEGATRON_IFT_DEBUG"] = "1"  # the command's own error reporting reads it
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: megatron-ift [--debug] <command> [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
