"""Local SFT files as Hugging Face ``datasets``: loading, format detection and error locations.

Each input path is loaded on its own (so every row knows its file and row number for error
messages) with the ``datasets`` builder its extension names: ``.jsonl``/``.json`` -> ``json``,
``.parquet`` -> ``parquet``, ``.arrow`` -> ``arrow``, ``.csv`` -> ``csv``; a folder written by
``Dataset.save_to_disk`` -> ``load_from_disk``. A file is a *chat* file when it has the messages
column, else a *pair* file when it has the prompt and response columns.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

from megatron_ift.data.errors import DataError

_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
}

CHAT = "chat"
PAIR = "pair"


@dataclass(frozen=True)
class Source:
    """One loaded input file."""

    path: str
    """The file or folder as configured."""
    dataset: Any
    """Its rows, a ``datasets.Dataset``."""
    kind: str
    """``chat`` (a messages column) or ``pair`` (prompt and response columns)."""
    columns: dict[str, Optional[str]]
    """The columns this kind reads: messages, or prompt / response / system (system may be None)."""


def _builder(path: str) -> Optional[str]:
    if os.path.isdir(path):
        return None  # save_to_disk folder
    for ext, builder in _BUILDERS.items():
        if path.endswith(ext) or path.endswith(ext + ".gz"):
            return builder
    raise DataError(
        f"{path}: unsupported file type; expected one of {', '.join(_BUILDERS)} or a folder "
        "written by datasets' save_to_disk"
    )


def _first_bad_json_line(path: str) -> Optional[str]:
    """``file:line: reason`` for the first line of a JSON Lines file that does not parse."""
    if path.endswith(".gz"):
        return None
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})"
    return None


def refuse_non_utf8(path: str, exc: UnicodeDecodeError) -> NoReturn:
    """Raise the error for a text file with bytes that are not UTF-8, naming the first such line.

    datasets' readers accept such a file and fail only when a column is read (a bare
    ``UnicodeDecodeError`` from pyarrow, at no particular row); this finds the line.
    """
    where, byte, column = path, exc.object[exc.start] if exc.object else 0, exc.start + 1
    if os.path.isfile(path):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            for number, line in enumerate(fh, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    where, byte, column = f"{path}:{number}", line[bad.start], bad.start + 1
                    break
    raise DataError(f"{where}: not valid UTF-8 (byte 0x{byte:02x} at byte {column} of the line); "
                    "re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def load_file(path: str, cache_dir: Optional[str] = None) -> Any:
    """Rows of one local file or ``save_to_disk`` folder as a ``datasets.Dataset``.

    Raises:
        DataError: missing or unsupported file, unparsable content, or no rows.
    """
    import datasets

    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder (data.paths)")
    builder = _builder(path)
    if builder is not None and os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty (no rows)")
    try:
        if builder is None:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(
                    f"{path}: holds a DatasetDict with splits {sorted(ds)}; point data.paths at "
                    "one split's folder"
                )
        else:
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as exc:  # datasets wraps parser errors in its own, uninformative types
        where = _first_bad_json_line(path) if builder == "json" else None
        raise DataError(
            where or f"{path}: cannot be read as {builder or 'a saved dataset'}: {exc}"
        ) from exc
    if len(ds) == 0:
        raise DataError(f"{path}: has no rows")
    return ds


def detect(path: str, dataset: Any, column: Any) -> Source:
    """Classify a loaded file as chat or pair data from its columns.

    Args:
        path: the file, for messages.
        dataset: its rows.
        column: ``DataConfig.column``, mapping a logical column to its configured name.

    Raises:
        DataError: neither the messages column nor both prompt and response columns exist.
    """
    names = set(dataset.column_names)
    messages = column("messages")
    if messages in names:
        return Source(path, dataset, CHAT, {"messages": messages})
    prompt, response, system = column("prompt"), column("response"), column("system")
    if prompt in names and response in names:
        return Source(
            path,
            dataset,
            PAIR,
            {
                "prompt": prompt,
                "response": response,
                "system": system if system in names else None,
            },
        )
    missing = [c for c in (prompt, response) if c not in names]
    raise DataError(
        f"{path}: missing column(s); it has {sorted(names)} but chat data needs a {messages!r} "
        f"column and pair data {prompt!r} and {response!r} (missing {missing}); rename them with "
        "data.columns"
    )


def load_sources(
    paths: tuple[str, ...], column: Any, cache_dir: Optional[str] = None
) -> list[Source]:
    """Load and classify every configured SFT input, in order."""
    return [detect(p, load_file(p, cache_dir), column) for p in paths]
