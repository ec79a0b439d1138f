"""DataConfig: where the training data comes from and how it becomes fixed-length sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_ift.data.templates import AUTO, FALLBACK_TEMPLATES, is_literal_template
from megatron_ift.config_io import check_literals
from megatron_ift.validation import ConfigError, check_positive_int, check_range

DEFAULT_COLUMNS = {
    "messages": "messages",
    "prompt": "prompt",
    "response": "response",
    "system": "system",
    "role": "role",
    "content": "content",
}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data pipeline's options (``data:`` in a run's YAML)."""

    format: Literal["sft", "pretrain"] = "sft"
    """``sft``: conversations or prompt/response pairs, loss on assistant tokens only.
    ``pretrain``: Megatron indexed ``.bin/.idx`` token files (``tools/preprocess_data.py``),
    loss on every token."""
    paths: tuple[str, ...] = ()
    """Inputs. ``sft``: local ``.jsonl``/``.json``/``.parquet``/``.arrow`` files or
    ``save_to_disk`` folders, concatenated in order. ``pretrain``: indexed path prefixes
    (``out/text`` for ``out/text.bin`` + ``out/text.idx``)."""
    weights: Optional[tuple[float, ...]] = None
    """``pretrain`` only: blending weights, one per path (normalised); None blends by size."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column-name overrides for ``sft`` files, keys from ``messages``, ``prompt``, ``response``,
    ``system`` (optional system prompt of a pair) and ``role``/``content`` (keys inside a
    message), e.g. ``{"messages": "conversations"}``."""
    tokenizer_path: str = ""
    """Local Hugging Face tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``)."""
    chat_template: str = AUTO
    """``auto`` (the tokenizer's own template), a named fallback (``chatml``,
    ``chatml_generation``) or literal Jinja source."""
    seq_length: int = 1024
    """Tokens per sequence; every micro-batch is padded to exactly this length."""
    packing: bool = True
    """``sft``: pack several samples per sequence (segment ids, attention never crosses a
    segment). ``pretrain``: split sequences at end-of-document tokens the same way; off, documents
    run on into each other as in plain GPT pretraining."""
    segment_multiple: int = 1
    """``sft`` with packing: pad every packed sample (segment) to a multiple of this many tokens
    (pads trained nowhere, in the sample's segment, positions running on). Transformer Engine's
    THD context parallelism splits every segment into ``2 x parallel.context_parallel_size``
    chunks: the trainer then pads to the least common multiple of this and that by itself; set it
    here to give another run (the local spec, CP 1) the same rows. Must divide
    ``seq_length``."""
    truncation: Literal["drop", "truncate"] = "drop"
    """Samples longer than ``seq_length``: ``drop`` them or ``truncate`` them to it (both
    counted in the build report)."""
    num_proc: int = 1
    """Processes for tokenisation (``datasets.map``)."""
    cache_dir: Optional[str] = None
    """Cache for loaded files, tokenised samples and megatron-core index files (None: the
    ``datasets`` default cache, and megatron-core's cache beside the ``.bin`` files)."""
    seed: int = 1234
    """Seed of the held-out split and of the per-epoch sample order."""
    eval_fraction: float = 0.0
    """Fraction of samples (``sft``) or documents (``pretrain``) held out for evaluation."""
    shuffle: bool = True
    """Shuffle the training order every epoch (``sft``; megatron-core's GPTDataset already
    shuffles ``pretrain`` samples with ``seed``)."""

    def __post_init__(self) -> None:
        # YAML gives lists and single strings; store tuples so the config stays immutable.
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths or ())
        object.__setattr__(self, "paths", paths)
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "columns", dict(self.columns or {}))

        check_literals(self, "data")
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ConfigError(f"data.paths={list(paths)!r} must list at least one file or prefix")
        if not isinstance(self.tokenizer_path, str) or not self.tokenizer_path:
            raise ConfigError("data.tokenizer_path must name a local tokenizer folder")
        self._check_weights()
        self._check_columns()
        self._check_template()
        check_positive_int("data.seq_length", self.seq_length)
        if self.seq_length < 2:
            raise ConfigError(
                f"data.seq_length={self.seq_length} must be >= 2 (one token and its label)"
            )
        check_positive_int("data.num_proc", self.num_proc)
        check_positive_int("data.segment_multiple", self.segment_multiple)
        if self.seq_length % self.segment_multiple:
            raise ConfigError(
                f"data.segment_multiple={self.segment_multiple} must divide "
                f"data.seq_length={self.seq_length} (a padded segment must fit a row)")
        if self.segment_multiple > 1 and not (self.format == "sft" and self.packing):
            raise ConfigError(
                f"data.segment_multiple={self.segment_multiple} pads packed samples: it needs "
                "data.format=sft with data.packing=true (pretraining documents run on and are not "
                "padded); set data.segment_multiple=1")
        check_range("data.eval_fraction", self.eval_fraction, 0.0, 1.0, high_inclusive=False)
        for name in ("packing", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"data.{name}={getattr(self, name)!r} must be true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"data.seed={self.seed!r} must be a non-negative integer")
        if self.cache_dir is not None and (
            not isinstance(self.cache_dir, str) or not self.cache_dir
        ):
            raise ConfigError(f"data.cache_dir={self.cache_dir!r} must be a folder path or null")

    def _check_weights(self) -> None:
        if self.weights is None:
            return
        if self.format != "pretrain":
            raise ConfigError(
                "data.weights is only used by data.format='pretrain' (megatron-core blending); "
                "remove it for sft data"
            )
        if len(self.weights) != len(self.paths):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}"
            )
        for i, w in enumerate(self.weights):
            check_range(f"data.weights[{i}]", w, 0.0, low_inclusive=False)

    def _check_columns(self) -> None:
        for key, value in self.columns.items():
            if key not in DEFAULT_COLUMNS:
                raise ConfigError(
                    f"data.columns has unknown key {key!r}; known keys: "
                    f"{', '.join(DEFAULT_COLUMNS)}"
                )
            if not isinstance(value, str) or not value:
                raise ConfigError(f"data.columns.{key}={value!r} must be a non-empty column name")

    def _check_template(self) -> None:
        t = self.chat_template
        if not isinstance(t, str) or not t:
            raise ConfigError(f"data.chat_template={t!r} must be 'auto', a fallback name or Jinja")
        if t != AUTO and not is_literal_template(t) and t not in FALLBACK_TEMPLATES:
            raise ConfigError(
                f"data.chat_template={t!r} is not 'auto', a known fallback "
                f"({', '.join(sorted(FALLBACK_TEMPLATES))}) or a Jinja template"
            )

    def column(self, key: str) -> str:
        """The configured name of column ``key`` (``messages``, ``prompt``, ...)."""
        return self.columns.get(key, DEFAULT_COLUMNS[key])
