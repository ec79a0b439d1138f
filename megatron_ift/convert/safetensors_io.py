"""Minimal safetensors I/O for streaming: header-only scans, one-tensor reads, incremental writes.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}`` padded with spaces, then the raw
little-endian tensor bytes. Reading a tensor with ``readinto`` into a fresh buffer (instead of
memory-mapping the whole shard) keeps the resident memory at exactly the tensors in flight, and
writing from a precomputed header lets a shard be filled tensor by tensor, so neither direction
ever holds a whole shard, let alone the model.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from megatron_ift.convert import ConversionError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("megatron_ift.convert.safetensors_io needs a little-endian machine")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    path: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the data in the file."""
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file (reads only its header).

    Raises:
        ConversionError: the file is missing, truncated or not safetensors.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConversionError(f"{path} is truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ConversionError(
                    f"{path} is not a safetensors file (header of {length} bytes)"
                )
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError as exc:
        raise ConversionError(f"weight file {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} is not a safetensors file ({exc})") from exc
    start = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if start + end > size:
            raise ConversionError(f"{path} is truncated: tensor {name} ends past the file end "
                                  "(re-download or re-save the shard)")
        out[name] = TensorEntry(path, name, DTYPES[info["dtype"]], tuple(info["shape"]),
                                start + begin, start + end)
    return out


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into a new CPU tensor (no memory map)."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.path, "rb") as f:
        f.seek(entry.begin)
        got = f.readinto(memoryview(buf.numpy()))
    if got != entry.nbytes:
        raise ConversionError(f"{entry.path}: short read of tensor {entry.name}")
    if entry.dtype == torch.bool:
        return buf.view(torch.bool).reshape(entry.shape)
    return buf.view(entry.dtype).reshape(entry.shape)


def tensor_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in any order, from a header fixed up front.

    Args:
        path: the file to create.
        tensors: (name, dtype, shape) of every tensor the file will hold, in file order.
        metadata: the header's ``__metadata__`` (strings only).
    """

    def __init__(self, path: str, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._slots: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in tensors:
            n = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            self._slots[name] = (offset, dtype, tuple(shape))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        self.path = path
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (its dtype and shape must be the declared ones)."""
        offset, dtype, shape = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ConversionError(
                f"internal error: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"declared {dtype} {shape}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(data.numpy()))
        self._written.add(name)

    def close(self) -> None:
        """Close the file; raises if a declared tensor was never written."""
        self._file.close()
        missing = set(self._slots) - self._written
        if missing:
            raise ConversionError(f"internal error: {self.path} lacks {sorted(missing)[:5]}")
