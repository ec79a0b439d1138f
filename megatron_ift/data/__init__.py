"""Data pipeline: SFT conversations and pretraining text into resumable micro-batches.

Training loop entry points: :func:`build_data` -> :meth:`Data.train_iterator` /
:meth:`Data.eval_iterator`; :func:`check_vocab` against the model; attention masks for packed
rows with :func:`packed_attention_mask` (local spec) or :func:`cu_seqlens` (Transformer Engine's
THD rows). Imports of heavy libraries (datasets, transformers, megatron-core's datasets) happen
inside the functions that need them: loading a run config must stay fast.
"""

from megatron_ift.data.batch import Batch
from megatron_ift.data.collate import collate
from megatron_ift.data.config import DataConfig
from megatron_ift.data.errors import DataError
from megatron_ift.data.loader import Data, MicroBatchIterator, build_data
from megatron_ift.data.packing import (
    attention_mask,
    causal_attention_mask,
    cu_seqlens,
    packed_attention_mask,
)
from megatron_ift.data.sampler import ResumableSampler
from megatron_ift.data.tokenizer import check_vocab, load_tokenizer

__all__ = [
    "Batch",
    "Data",
    "DataConfig",
    "DataError",
    "MicroBatchIterator",
    "ResumableSampler",
    "attention_mask",
    "build_data",
    "causal_attention_mask",
    "check_vocab",
    "collate",
    "cu_seqlens",
    "load_tokenizer",
    "packed_attention_mask",
]
