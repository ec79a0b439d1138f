"""Data errors that point at the offending file and line (or row), so a bad record is found fast."""

from __future__ import annotations

import os
from typing import Optional

from megatron_ift.errors import DataError

__all__ = ["DataError", "describe_row"]


def describe_row(path: str, row: int) -> str:
    """Where 0-based ``row`` of a loaded file is: ``file.jsonl:57`` or ``file.parquet row 56``.

    For JSON Lines files the row is mapped back to its 1-based line number, skipping the blank
    lines the JSON reader ignores. The file is only re-read on this (error) path.

    Args:
        path: the file (or ``save_to_disk`` folder) the row came from.
        row: the 0-based row index within that file.

    Returns:
        A string such as ``data/sft.jsonl:57`` or ``data/sft.parquet row 56``.
    """
    line = _jsonl_line(path, row) if path.endswith((".jsonl", ".jsonl.gz")) else None
    return f"{path}:{line}" if line is not None else f"{path} row {row}"


def _jsonl_line(path: str, row: int) -> Optional[int]:
    if not os.path.isfile(path) or path.endswith(".gz"):
        return None
    seen = -1
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return number
    return None
