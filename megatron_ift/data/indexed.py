"""Pretraining continuation: Megatron indexed token files read through megatron-core's GPTDataset.

``tools/preprocess_data.py`` writes ``<prefix>.bin`` / ``<prefix>.idx`` with megatron-core's
``IndexedDatasetBuilder``. Training reads them with megatron-core's ``GPTDataset`` (documents
concatenated and cut into ``seq_length + 1`` token windows, shuffled with the seed) and
``BlendedMegatronDatasetBuilder`` (several prefixes blended by weight, a held-out split by
documents). :class:`PretrainDataset` turns its samples into the micro-batch contract with a
loss on every token.

megatron-core's sample- and blend-index builders are a C++ extension (``helpers_cpp``). The
megatron-core 0.16.1 wheel ships it prebuilt, and that is what runs here. Its runtime builder
``megatron.core.datasets.utils.compile_helpers()`` cannot work from a wheel install (the wheel
has no Makefile, and pybind11 is not a dependency): it is only for source checkouts.
:func:`check_helpers` fails with that explanation if the extension is ever missing.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from megatron_ift.data.collate import assemble_row
from megatron_ift.data.config import DataConfig
from megatron_ift.data.errors import DataError
from megatron_ift.validation import ConfigError

logger = logging.getLogger(__name__)

_INDEX_HEADER = b"MMIDIDX\x00\x00"


def check_helpers() -> None:
    """Raise a clear error when megatron-core's compiled dataset helpers cannot be imported."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "megatron-core's C++ dataset helpers (megatron.core.datasets.helpers_cpp) are not "
            "importable; install a megatron-core wheel (it ships them prebuilt) or build them "
            "with megatron.core.datasets.utils.compile_helpers() (needs g++, make and pybind11)"
        ) from exc


def check_indexed(prefix: str) -> int:
    """Validate ``<prefix>.idx`` / ``<prefix>.bin`` before megatron-core reads them.

    Returns:
        The number of documents.

    Raises:
        DataError: a file is missing, the index is not a Megatron index or is truncated, or the
            data file's size does not match the index (naming the file).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(
                f"{path}: missing (data.paths prefix {prefix!r}; make it with "
                "tools/preprocess_data.py)"
            )
    with open(idx_path, "rb") as fh:
        head = fh.read(18)
    if len(head) < 18 or head[:9] != _INDEX_HEADER:
        raise DataError(f"{idx_path}: unreadable index, not a Megatron .idx file (bad header)")
    version, code = struct.unpack("<Q", head[9:17])[0], head[17]
    if version != 1 or code not in {d.value for d in DType}:
        raise DataError(f"{idx_path}: unreadable index (version {version}, dtype code {code})")
    with open(idx_path, "rb") as fh:
        fh.seek(18)
        counts = fh.read(16)
    if len(counts) < 16:
        raise DataError(f"{idx_path}: unreadable index (truncated header)")
    sequences, docs = struct.unpack("<QQ", counts)
    # Header (34 bytes), then int32 lengths, int64 pointers and int64 document indices.
    needed = 34 + sequences * (4 + 8) + docs * 8
    if os.path.getsize(idx_path) < needed:
        raise DataError(
            f"{idx_path}: unreadable index (truncated: {os.path.getsize(idx_path)} bytes, "
            f"{needed} needed for {sequences} sequences)"
        )
    try:
        ds = IndexedDataset(prefix, mmap=True)
        lengths, dtype = ds.sequence_lengths, ds.index.dtype
        documents = len(ds.document_indices) - 1
    except Exception as exc:  # truncated index: numpy.frombuffer / megatron asserts
        raise DataError(f"{idx_path}: unreadable index ({type(exc).__name__}: {exc})") from exc
    expected = int(np.asarray(lengths, dtype=np.int64).sum()) * np.dtype(dtype).itemsize
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise DataError(f"{bin_path}: {actual} bytes, but {idx_path} describes {expected}")
    return documents


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _split_string(eval_fraction: float) -> str:
    return f"{1.0 - eval_fraction},{eval_fraction},0"


class PretrainDataset:
    """megatron-core GPT samples in the micro-batch layout.

    Without packing: positions ``0..s-1``, loss on every token, no segment ids (plain GPT
    pretraining, documents run on). With packing: a new segment after every end-of-document
    token, positions restarting per segment, no loss at end-of-document positions (their label
    is the next document's first token), attention kept within documents.

    Args:
        dataset: a megatron-core ``GPTDataset`` or ``BlendedDataset``.
        seq_length: its sequence length.
        eod_id / pad_id: end-of-document and padding ids.
        packing: split rows at end-of-document tokens.
    """

    def __init__(
        self, dataset: Any, *, seq_length: int, eod_id: int, pad_id: int, packing: bool
    ) -> None:
        self.dataset = dataset
        self.seq_length, self.eod_id, self.pad_id, self.packed = seq_length, eod_id, pad_id, packing

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as a row (its sample id is ``i``, the index into the built dataset)."""
        item = self.dataset[int(i)]
        tokens = item["tokens"].numpy().astype(np.int64)  # [s]
        row = {
            "tokens": tokens,
            "labels": item["labels"].numpy().astype(np.int64),
            "loss_mask": item["loss_mask"].numpy().astype(np.float32),
            "position_ids": np.arange(self.seq_length, dtype=np.int64),
        }
        if self.packed:
            is_eod = tokens == self.eod_id
            segment = np.zeros(self.seq_length, dtype=np.int64)
            segment[1:] = np.cumsum(is_eod[:-1])  # the EOD token closes its document
            starts = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]])
            row["position_ids"] = np.arange(self.seq_length) - np.repeat(
                starts, np.diff(np.r_[starts, self.seq_length])
            )
            row["loss_mask"][is_eod] = 0.0
            row["segment_ids"] = segment
        row["sample_ids"] = np.asarray(i, dtype=np.int64)
        return row

    def empty_row(self) -> dict[str, np.ndarray]:
        return assemble_row([], self.seq_length, self.pad_id, -1, self.packed)


@dataclass
class PretrainReport:
    """What the pretraining data holds."""

    prefixes: list[str]
    documents: list[int]
    weights: Optional[list[float]]
    train_samples: int
    eval_samples: int

    def summary(self) -> str:
        parts = ", ".join(f"{p} ({d} docs)" for p, d in zip(self.prefixes, self.documents))
        return (
            f"pretrain data: {parts}; weights {self.weights or 'by size'}; "
            f"{self.train_samples} train / {self.eval_samples} eval sequences"
        )


def build_pretrain(
    cfg: DataConfig,
    *,
    train_samples: Optional[int] = None,
    eval_samples: Optional[int] = None,
) -> tuple[PretrainDataset, Optional[PretrainDataset], PretrainReport]:
    """Train (and eval) datasets over indexed token files, blended by ``cfg.weights``.

    Args:
        cfg: the data options (``format='pretrain'``, ``paths`` are indexed prefixes).
        train_samples: sequences training will draw (global batch x steps); None builds one
            epoch. Required with ``weights`` (megatron-core sizes each blend part from it).
        eval_samples: sequences evaluation will draw; None builds one epoch of the held-out
            documents (not allowed with ``weights``).

    Returns:
        ``(train, eval or None, report)``.

    Raises:
        DataError: unreadable index/data files. ConfigError: weights without sample counts.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_ift.data.tokenizer import megatron_tokenizer

    check_helpers()
    documents = [check_indexed(p) for p in cfg.paths]
    if cfg.weights is not None and (
        train_samples is None or (cfg.eval_fraction > 0 and eval_samples is None)
    ):
        raise ConfigError(
            "data.weights needs the number of sequences to draw: pass train_samples (and "
            "eval_samples when data.eval_fraction > 0) to build the pretraining data"
        )
    tokenizer = megatron_tokenizer(cfg.tokenizer_path)
    cache = os.path.join(cfg.cache_dir, "gpt_indices") if cfg.cache_dir else None
    if cache and len(cfg.paths) > 1 and not _distributed():
        # megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() when it has a
        # cache folder, which fails outside torch.distributed. Without one it builds its blend
        # index in memory and each GPTDataset caches its indices beside its .bin file.
        logger.warning("no torch.distributed: blend indices are not cached (data.cache_dir unused)")
        cache = None
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=(list(cfg.paths), list(cfg.weights) if cfg.weights else None),
        split=_split_string(cfg.eval_fraction),
        path_to_cache=cache,
        tokenizer=tokenizer,
        # Segments and their masks are made by PretrainDataset; megatron's dense [1, s, s] mask
        # per sample is not needed.
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # Splits with no documents get size 0 (megatron-core then builds nothing for them).
    sizes = [train_samples, eval_samples if cfg.eval_fraction > 0 else 0, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None or len(train) == 0:
        raise DataError(
            f"no training sequence of {cfg.seq_length + 1} tokens in {', '.join(cfg.paths)} "
            f"({sum(documents)} documents)"
        )
    pad = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod

    def wrap(ds: Any) -> PretrainDataset:
        return PretrainDataset(
            ds, seq_length=cfg.seq_length, eod_id=tokenizer.eod, pad_id=pad, packing=cfg.packing
        )

    evaluation = wrap(valid) if valid is not None and len(valid) > 0 else None
    report = PretrainReport(
        prefixes=list(cfg.paths),
        documents=documents,
        weights=list(cfg.weights) if cfg.weights else None,
        train_samples=len(train),
        eval_samples=len(evaluation) if evaluation else 0,
    )
    logger.info(report.summary())
    return wrap(train), evaluation, report
