"""SFT data: local files -> tokenised samples with assistant masks -> fixed-length rows.

Pipeline (:func:`build_sft`):

1. load each file with ``datasets`` (:mod:`megatron_ift.data.sources`), chat or pair format;
2. tokenise with ``Dataset.map`` (``num_proc`` processes, results cached as Arrow files under a
   fingerprint of the input, tokenizer files, template and options); pairs become
   ``[system?, user, assistant]`` conversations; every malformed row fails with its file and line;
3. apply the truncation policy to samples longer than ``seq_length`` (``drop`` / ``truncate``)
   and drop samples left without a trained token, counting both;
4. hold out ``eval_fraction`` of the rows (a seeded choice over global row ids, so the split does
   not move when ``seq_length`` or the truncation policy change);
5. pack (best-fit decreasing) or keep one sample per row: :class:`SFTDataset`.

The global sample id of a row is its index in the concatenation of the input files, in order.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from megatron_ift.data.chat import ChatEncoder, check_messages
from megatron_ift.data.collate import assemble_row, empty_row
from megatron_ift.data.config import DataConfig
from megatron_ift.data.errors import DataError, describe_row
from megatron_ift.data.packing import pack_best_fit, packing_efficiency
from megatron_ift.data.sources import CHAT, Source, load_sources, refuse_non_utf8
from megatron_ift.data.templates import resolve_chat_template
from megatron_ift.data.tokenizer import pad_token_id

logger = logging.getLogger(__name__)

# Bump when the tokenised layout or masking rule changes, so stale caches are not reused.
_CACHE_VERSION = "sft-v1"

OK, TRUNCATED, TOO_LONG, NO_ANSWER = 0, 1, 2, 3


class _Tokenize:
    """``Dataset.map`` function for one source file (picklable, for ``num_proc`` workers)."""

    def __init__(
        self, source: Source, encoder: ChatEncoder, cfg: DataConfig, id_offset: int
    ) -> None:
        self.path = source.path
        self.kind = source.kind
        self.columns = source.columns
        self.encoder = encoder
        self.role_key, self.content_key = cfg.column("role"), cfg.column("content")
        self.seq_length = cfg.seq_length
        self.truncate = cfg.truncation == "truncate"
        self.id_offset = id_offset

    def _messages(self, batch: dict, i: int) -> list[dict]:
        if self.kind == CHAT:
            return check_messages(
                batch[self.columns["messages"]][i], self.role_key, self.content_key
            )
        prompt = batch[self.columns["prompt"]][i]
        response = batch[self.columns["response"]][i]
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise ValueError(f"column {self.columns[name]!r} is {value!r}, not a string")
        msgs = []
        system = batch[self.columns["system"]][i] if self.columns.get("system") else None
        if isinstance(system, str) and system:  # None / NaN / "" mean no system prompt
            msgs.append({"role": "system", "content": system})
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return msgs

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        conversations = []
        for i, row in enumerate(indices):
            try:
                conversations.append(self._messages(batch, i))
            except UnicodeDecodeError as exc:  # a column is decoded (whole) when first read
                refuse_non_utf8(self.path, exc)
            except ValueError as exc:
                raise DataError(f"{describe_row(self.path, row)}: {exc}") from None
        try:
            encoded = self.encoder.encode(conversations)
        except ValueError:
            # Find the offending row for the message (only on this error path).
            for conv, row in zip(conversations, indices):
                try:
                    self.encoder.encode([conv])
                except ValueError as exc:
                    raise DataError(f"{describe_row(self.path, row)}: {exc}") from None
            raise
        out: dict[str, list] = {
            k: [] for k in ("input_ids", "assistant_mask", "sample_id", "full_length", "status")
        }
        for enc, row in zip(encoded, indices):
            ids, mask, status = enc.input_ids, enc.assistant_mask, OK
            if len(ids) > self.seq_length:
                if self.truncate:
                    ids, mask, status = ids[: self.seq_length], mask[: self.seq_length], TRUNCATED
                else:
                    ids, mask, status = [], [], TOO_LONG  # not stored: dropped below
            if status != TOO_LONG and sum(mask[1:]) == 0:
                status = NO_ANSWER  # e.g. the prompt alone fills seq_length
            out["input_ids"].append(ids)
            out["assistant_mask"].append(mask)
            out["sample_id"].append(self.id_offset + row)
            out["full_length"].append(len(enc.input_ids))
            out["status"].append(status)
        return out


def _features() -> Any:
    from datasets import Features, Sequence, Value

    return Features(
        {
            "input_ids": Sequence(Value("int32")),
            "assistant_mask": Sequence(Value("int8")),
            "sample_id": Value("int64"),
            "full_length": Value("int32"),
            "status": Value("int8"),
        }
    )


def _folder_digest(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            h.update(name.encode())
            with open(full, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def _cache_root(cfg: DataConfig) -> str:
    if cfg.cache_dir:
        root = os.path.join(cfg.cache_dir, "sft")
    else:
        import datasets

        root = os.path.join(str(datasets.config.HF_DATASETS_CACHE), "megatron_ift_sft")
    os.makedirs(root, exist_ok=True)
    return root


def tokenize_sources(sources: list[Source], tokenizer: Any, template: str, cfg: DataConfig) -> Any:
    """All sources tokenised and concatenated (one row per input row, in order).

    Columns: ``input_ids``, ``assistant_mask`` (empty for dropped rows), ``sample_id``,
    ``full_length`` (before truncation) and ``status`` (OK, TRUNCATED, TOO_LONG, NO_ANSWER).
    """
    import datasets

    encoder = ChatEncoder(tokenizer, template)
    tok_digest = _folder_digest(cfg.tokenizer_path)
    root = _cache_root(cfg)
    parts, offset = [], 0
    for src in sources:
        key = "|".join(
            map(
                str,
                (
                    _CACHE_VERSION,
                    src.dataset._fingerprint,
                    src.kind,
                    sorted(src.columns.items()),
                    cfg.column("role"),
                    cfg.column("content"),
                    tok_digest,
                    template,
                    cfg.seq_length,
                    cfg.truncation,
                    offset,
                ),
            )
        )
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
        num_proc = min(cfg.num_proc, len(src.dataset))
        parts.append(
            src.dataset.map(
                _Tokenize(src, encoder, cfg, offset),
                batched=True,
                batch_size=256,
                with_indices=True,
                remove_columns=src.dataset.column_names,
                features=_features(),
                num_proc=num_proc if num_proc > 1 else None,
                new_fingerprint=fingerprint,
                cache_file_name=os.path.join(root, f"tokenized-{fingerprint}.arrow"),
                desc=f"tokenising {os.path.basename(src.path)}",
            )
        )
        offset += len(src.dataset)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


@dataclass
class SFTReport:
    """What the build did to the data (log it; the truncation policy is visible here)."""

    files: list[str]
    rows: int = 0
    """Input rows (all files)."""
    truncated: int = 0
    """Samples cut to ``seq_length`` (``truncation: truncate``)."""
    dropped_too_long: int = 0
    """Samples longer than ``seq_length`` dropped (``truncation: drop``)."""
    dropped_no_answer: int = 0
    """Samples without a trained token after truncation."""
    train_samples: int = 0
    eval_samples: int = 0
    train_rows: int = 0
    """Sequences of ``seq_length`` the training samples occupy (fewer than samples when packed)."""
    eval_rows: int = 0
    train_tokens: int = 0
    """Real tokens in the training rows."""
    trained_tokens: int = 0
    """Tokens with loss in the training rows."""
    packing_efficiency: float = 0.0
    """Fraction of training-row slots holding real tokens (1.0 = no padding)."""
    longest: int = 0
    """Longest sample before truncation, in tokens."""
    per_file: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"SFT data: {self.rows} rows from {len(self.files)} file(s); "
            f"{self.train_samples} train / {self.eval_samples} eval samples; "
            f"truncated {self.truncated}, dropped {self.dropped_too_long} too long and "
            f"{self.dropped_no_answer} without an answer token (longest {self.longest} tokens); "
            f"{self.train_rows} train rows, {self.train_tokens} tokens ({self.trained_tokens} "
            f"trained), packing efficiency {self.packing_efficiency:.1%}"
        )


class SFTDataset:
    """Fixed-length rows of tokenised samples: packed several to a row, or one per row.

    Args:
        token_values / token_offsets: all samples' ids, flat, with CSR offsets (numpy).
        mask_values: the matching flat assistant masks.
        members: ``[n]`` the samples (positions in the flat arrays) this split uses.
        sample_ids: ``[n]`` their global sample ids.
        seq_length, pad_id, packing: the row layout.
        segment_multiple: packed rows: every sample padded to a multiple of this many tokens
            (:func:`~megatron_ift.data.collate.assemble_row`).
    """

    def __init__(
        self,
        token_values: np.ndarray,
        token_offsets: np.ndarray,
        mask_values: np.ndarray,
        members: np.ndarray,
        sample_ids: np.ndarray,
        *,
        seq_length: int,
        pad_id: int,
        packing: bool,
        segment_multiple: int = 1,
    ) -> None:
        self._values, self._offsets, self._masks = token_values, token_offsets, mask_values
        self.members, self.sample_ids = members, sample_ids
        self.seq_length, self.pad_id, self.packed = seq_length, pad_id, packing
        self.segment_multiple = segment_multiple
        self.lengths = (token_offsets[members + 1] - token_offsets[members]).astype(np.int64)
        if packing:
            padded = -(-self.lengths // segment_multiple) * segment_multiple
            self.row_offsets, self.row_items = pack_best_fit(padded, seq_length)
        else:
            self.row_offsets = np.arange(len(members) + 1, dtype=np.int64)
            self.row_items = np.arange(len(members), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def efficiency(self) -> float:
        return packing_efficiency(self.num_tokens, len(self), self.seq_length)

    def row_samples(self, i: int) -> np.ndarray:
        """Positions (into ``members``) of the samples in row ``i``."""
        return self.row_items[self.row_offsets[i] : self.row_offsets[i + 1]]

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, assistant_mask)`` of the ``k``-th sample of this split."""
        m = self.members[k]
        lo, hi = self._offsets[m], self._offsets[m + 1]
        return self._values[lo:hi], self._masks[lo:hi]

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` in the micro-batch layout (:func:`~megatron_ift.data.collate.assemble_row`).

        Its sample id is that of its first sample: unique per row and stable for given data
        and options.
        """
        ks = self.row_samples(i)
        segments = [self.sample(int(k)) for k in ks]
        return assemble_row(
            segments, self.seq_length, self.pad_id, int(self.sample_ids[ks[0]]), self.packed,
            self.segment_multiple if self.packed else 1,
        )

    def empty_row(self) -> dict[str, np.ndarray]:
        return empty_row(self.seq_length, self.pad_id, self.packed)


def _flat(table: Any, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and offsets of a list column of an Arrow table."""
    arr = table.column(column).combine_chunks()
    if hasattr(arr, "chunks"):  # older pyarrow returns a ChunkedArray of one chunk
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.chunks[0].concat(arr.chunks[1:])
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    # Offsets may not start at 0 for sliced arrays; normalise so values[offsets[i]:...] works.
    return values[offsets[0] :], offsets - offsets[0]


def eval_members(num_rows: int, fraction: float, seed: int) -> np.ndarray:
    """``[num_rows]`` bool: the held-out rows, a seeded choice of ``round(fraction * n)`` rows
    (at least one when ``fraction > 0``)."""
    held = np.zeros(num_rows, dtype=bool)
    if fraction > 0:
        n_eval = max(1, int(round(fraction * num_rows)))
        held[np.random.default_rng([seed, 0x5EED]).permutation(num_rows)[:n_eval]] = True
    return held


def build_sft(
    cfg: DataConfig, tokenizer: Any
) -> tuple[SFTDataset, Optional[SFTDataset], SFTReport]:
    """Train (and eval) SFT datasets from ``cfg``.

    Args:
        cfg: the data options (``format='sft'``).
        tokenizer: the loaded tokenizer of ``cfg.tokenizer_path``.

    Returns:
        ``(train, eval or None, report)``.

    Raises:
        DataError: unreadable or malformed inputs (naming file and line), a tokenizer without a
            chat template and no fallback, or no usable training sample.
    """
    template = resolve_chat_template(tokenizer, cfg.chat_template, cfg.tokenizer_path)
    sources = load_sources(cfg.paths, cfg.column, cfg.cache_dir)
    tokenized = tokenize_sources(sources, tokenizer, template, cfg)
    table = tokenized.with_format("arrow")[:]  # pyarrow.Table (indices already applied)
    values, offsets = _flat(table, "input_ids")
    masks, _ = _flat(table, "assistant_mask")
    status = table.column("status").to_numpy()
    sample_ids = table.column("sample_id").to_numpy().astype(np.int64)
    full_length = table.column("full_length").to_numpy()

    report = SFTReport(files=list(cfg.paths), rows=len(status))
    report.truncated = int((status == TRUNCATED).sum())
    report.dropped_too_long = int((status == TOO_LONG).sum())
    report.dropped_no_answer = int((status == NO_ANSWER).sum())
    report.longest = int(full_length.max()) if full_length.size else 0
    usable = (status == OK) | (status == TRUNCATED)
    held = eval_members(len(status), cfg.eval_fraction, cfg.seed)
    train_pos = np.nonzero(usable & ~held)[0]
    eval_pos = np.nonzero(usable & held)[0]
    if train_pos.size == 0:
        raise DataError(
            f"no usable training sample in {', '.join(cfg.paths)}: {report.rows} rows, "
            f"{report.dropped_too_long} longer than data.seq_length={cfg.seq_length} (dropped), "
            f"{report.dropped_no_answer} without a trained token, "
            f"{int((usable & held).sum())} held out for eval"
        )
    pad = pad_token_id(tokenizer)

    def make(pos: np.ndarray) -> SFTDataset:
        return SFTDataset(
            values,
            offsets,
            masks,
            pos,
            sample_ids[pos],
            seq_length=cfg.seq_length,
            pad_id=pad,
            packing=cfg.packing,
            segment_multiple=cfg.segment_multiple,
        )

    train = make(train_pos)
    evaluation = make(eval_pos) if eval_pos.size else None
    report.train_samples, report.eval_samples = int(train_pos.size), int(eval_pos.size)
    report.train_rows, report.eval_rows = len(train), len(evaluation) if evaluation else 0
    report.train_tokens = train.num_tokens
    # A sample's first token is never a label, so its mask entry does not count.
    cum = np.concatenate([[0], np.cumsum(masks, dtype=np.int64)])
    lo, hi = offsets[train_pos], offsets[train_pos + 1]
    firsts = np.where(hi > lo, masks[np.minimum(lo, max(len(masks) - 1, 0))], 0)
    report.trained_tokens = int((cum[hi] - cum[lo] - firsts).sum())
    report.packing_efficiency = train.efficiency
    for src in sources:
        report.per_file[src.path] = {"rows": len(src.dataset), "format": src.kind}
    logger.info(report.summary())
    return train, evaluation, report
