"""JSON Lines text -> Megatron indexed ``.bin`` / ``.idx`` token files (megatron-core's builder).

Usage (``tools/preprocess_data.py`` forwards to :func:`main`)::

    python tools/preprocess_data.py --input data/pretrain_text.jsonl \\
        --output-prefix out/pretrain_text --tokenizer data/tokenizer --workers 4

Each line is one document; its ``--json-key`` text is tokenised (in ``--workers`` processes, in
input order), followed by the end-of-document token unless ``--no-append-eod``, and written with
megatron-core's ``IndexedDatasetBuilder``. The files are written under temporary names and
renamed at the end, so an interrupted run never leaves a half-written dataset behind.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np

from megatron_ift.data.errors import DataError

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, json_key: str, append_eod: bool) -> None:
    from megatron_ift.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    eod = tok.eos_token_id
    if append_eod and eod is None:
        raise DataError(
            f"the tokenizer at {tokenizer_path!r} has no end-of-sequence token to append"
        )
    _WORKER.update(tokenizer=tok, key=json_key, eod=eod if append_eod else None)


def _encode(item: tuple[str, int, str]) -> Optional[list[int]]:
    """Token ids of one JSON line (None for an empty text)."""
    path, number, line = item
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    key = _WORKER["key"]
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{path}:{number}: missing column {key!r} (set --json-key)")
    text = record[key]
    if not isinstance(text, str):
        raise DataError(f"{path}:{number}: column {key!r} is {type(text).__name__}, not text")
    if not text:
        return None
    ids = _WORKER["tokenizer"](text, add_special_tokens=False)["input_ids"]
    if _WORKER["eod"] is not None:
        ids.append(_WORKER["eod"])
    return ids


def _lines(paths: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    for path in paths:
        with open(path, "rb") as fh:  # decoded per line so that a bad byte names its line
            for number, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte "
                        f"{exc.start + 1} of the line); re-encode the file as UTF-8"
                    ) from None
                if line.strip():
                    yield path, number, line


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_path: str,
    *,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    chunk_size: int = 64,
    progress: bool = True,
) -> dict:
    """Tokenise ``inputs`` into ``output_prefix.bin/.idx``.

    Args:
        inputs: JSON Lines files, read in order (one document per non-blank line).
        output_prefix: path prefix of the output files.
        tokenizer_path: local Hugging Face tokenizer folder.
        json_key: the text field of each record.
        workers: tokenising processes (1: in this process).
        append_eod: append the end-of-sequence token to every document.
        chunk_size: lines per task sent to a worker.
        progress: show a tqdm progress bar.

    Returns:
        ``{"documents", "tokens", "skipped_empty"}`` counts.

    Raises:
        DataError: a missing input, or a line that is not JSON / lacks the key (file:line).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    from megatron_ift.data.tokenizer import load_tokenizer, tokenizer_size

    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such input file")
    vocab = tokenizer_size(load_tokenizer(tokenizer_path))
    dtype = DType.optimal_dtype(vocab)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    bin_tmp, idx_tmp = output_prefix + ".bin.tmp", output_prefix + ".idx.tmp"
    builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
    counts = {"documents": 0, "tokens": 0, "skipped_empty": 0}
    init_args = (tokenizer_path, json_key, append_eod)
    pool = None
    try:
        if workers > 1:
            # fork where available (as megatron's own preprocessing does): workers inherit the
            # imported libraries instead of re-importing transformers for seconds each.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = ctx.Pool(workers, _init_worker, init_args)
            results = pool.imap(_encode, _lines(inputs), chunksize=chunk_size)
        else:
            _init_worker(*init_args)
            results = map(_encode, _lines(inputs))
        for ids in tqdm(
            results, desc=f"tokenising -> {output_prefix}", unit=" docs", disable=not progress
        ):
            if ids is None:
                counts["skipped_empty"] += 1
                continue
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            counts["documents"] += 1
            counts["tokens"] += len(ids)
        builder.finalize(idx_tmp)
    except BaseException:
        builder.data_file.close()
        for path in (bin_tmp, idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if counts["documents"] == 0:
        os.remove(bin_tmp)
        os.remove(idx_tmp)
        raise DataError(f"{', '.join(inputs)}: no non-empty document (key {json_key!r})")
    os.replace(bin_tmp, output_prefix + ".bin")
    os.replace(idx_tmp, output_prefix + ".idx")
    return counts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenise JSON Lines text into Megatron indexed .bin/.idx files."
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSON Lines file(s), one document per line"
    )
    parser.add_argument(
        "--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx"
    )
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer folder")
    parser.add_argument(
        "--json-key", default="text", help="text field of each record (default: text)"
    )
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--chunk-size", type=int, default=64, help="lines per worker task")
    parser.add_argument(
        "--no-append-eod",
        dest="append_eod",
        action="store_false",
        help="do not end documents with the end-of-sequence token",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.chunk_size < 1:
        parser.error("--workers and --chunk-size must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the process exit status (3 for a data error, printed
    as one line; see ``megatron_ift.errors``)."""
    from megatron_ift.errors import run_cli

    return run_cli("megatron-ift preprocess", _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    from megatron_ift.platform import bootstrap

    args = parse_args(argv)
    bootstrap()  # megatron-core's indexed-dataset builder: imported with the platform set up
    counts = preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer,
        json_key=args.json_key,
        workers=args.workers,
        append_eod=args.append_eod,
        chunk_size=args.chunk_size,
        progress=not args.quiet,
    )
    print(
        f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, "
        f"{counts['tokens']} tokens ({counts['skipped_empty']} empty lines skipped)"
    )
    return 0
