"""Entry points for the training loop: build the data once, then resumable micro-batch iterators.

::

    data = build_data(cfg, train_samples=global_batch * train_steps)   # every rank
    check_vocab(data.tokenizer, model_cfg.vocab_size, cfg.tokenizer_path)
    it = data.train_iterator(dp_rank=r, dp_size=dp, micro_batch_size=mbs, num_microbatches=nmb)
    batch = next(it)                     # a data.batch.Batch of host tensors (pinned if asked)
    state = it.state_dict()              # store with the checkpoint; it.load_state_dict(state)
    for batch in data.eval_iterator(dp_rank=r, dp_size=dp, micro_batch_size=mbs): ...

Under ``torch.distributed`` the data is built on global rank 0 first (tokenisation, packing,
index files land in the caches), then on the other ranks, which load the cached results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

from megatron_ift.data.batch import Batch
from megatron_ift.data.collate import collate
from megatron_ift.data.config import DataConfig
from megatron_ift.data.sampler import PAD_INDEX, ResumableSampler


class RowSource(Protocol):
    """A dataset of fixed-length rows in the micro-batch layout (SFTDataset, PretrainDataset)."""

    seq_length: int
    packed: bool

    def __len__(self) -> int: ...

    def row(self, i: int) -> dict[str, np.ndarray]: ...

    def empty_row(self) -> dict[str, np.ndarray]: ...


class MicroBatchIterator:
    """This rank's micro-batches, in the sampler's order, with a resumable position.

    Args:
        source: the rows.
        sampler: the order (:class:`~megatron_ift.data.sampler.ResumableSampler`).
        pin_memory: page-locked batches, so the copy to a GPU overlaps compute (a real GPU).
    """

    def __init__(self, source: RowSource, sampler: ResumableSampler, *, pin_memory: bool = False) -> None:
        if len(source) != sampler.num_samples:
            raise ValueError(
                f"sampler covers {sampler.num_samples} rows but the source has {len(source)}"
            )
        self.source, self.sampler = source, sampler
        self.pin_memory = pin_memory

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> Batch:
        indices = self.sampler.next_indices()  # raises StopIteration after the last epoch
        rows = [
            self.source.empty_row() if i == PAD_INDEX else self.source.row(int(i)) for i in indices
        ]
        batch = collate(rows)
        return batch.pin_memory() if self.pin_memory else batch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) per epoch."""
        return self.sampler.global_batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from (save it with the model checkpoint, per DP rank or once:
        it is the same on every rank)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class Data:
    """Built datasets and the tokenizer, ready to hand out iterators."""

    config: DataConfig
    train: RowSource
    eval: Optional[RowSource]
    tokenizer: Any
    report: Any
    """An :class:`~megatron_ift.data.sft.SFTReport` or a
    :class:`~megatron_ift.data.indexed.PretrainReport`."""

    def train_iterator(
        self,
        *,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        num_microbatches: int,
        num_epochs: Optional[int] = None,
        pin_memory: bool = False,
    ) -> MicroBatchIterator:
        """Endless (or ``num_epochs``) training micro-batches of this data-parallel rank.

        Each epoch's order depends only on ``data.seed`` and the epoch; the global batch is
        ``micro_batch_size x num_microbatches x dp_size`` rows and the epoch's incomplete last
        global batch is dropped.
        """
        sampler = ResumableSampler(
            len(self.train),
            dp_rank=dp_rank,
            dp_size=dp_size,
            micro_batch_size=micro_batch_size,
            num_microbatches=num_microbatches,
            seed=self.config.seed,
            shuffle=self.config.shuffle and self.config.format == "sft",
            drop_last=True,
            num_epochs=num_epochs,
        )
        return MicroBatchIterator(self.train, sampler, pin_memory=pin_memory)

    def eval_iterator(
        self, *, dp_rank: int, dp_size: int, micro_batch_size: int, pin_memory: bool = False
    ) -> MicroBatchIterator:
        """One pass over the held-out rows in order, split over data-parallel ranks.

        The last micro-batch is completed with empty rows (``loss_mask`` 0, ``sample_ids`` -1)
        so that every rank runs the same number of steps and each row is seen exactly once.

        Raises:
            ValueError: there is no held-out split (``data.eval_fraction`` is 0).
        """
        if self.eval is None:
            raise ValueError("no eval split: set data.eval_fraction > 0")
        sampler = ResumableSampler(
            len(self.eval),
            dp_rank=dp_rank,
            dp_size=dp_size,
            micro_batch_size=micro_batch_size,
            num_microbatches=1,
            seed=self.config.seed,
            shuffle=False,
            drop_last=False,
            num_epochs=1,
        )
        return MicroBatchIterator(self.eval, sampler, pin_memory=pin_memory)


def _rank0_first(build):
    """Run ``build`` on global rank 0, then (after a barrier) on the other ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    result = build() if dist.get_rank() == 0 else None
    dist.barrier()
    if dist.get_rank() != 0:
        result = build()
    return result


def build_data(
    cfg: DataConfig,
    *,
    train_samples: Optional[int] = None,
    eval_samples: Optional[int] = None,
) -> Data:
    """Load, tokenise (or open the indexed files), split and pack the data of ``cfg``.

    Args:
        cfg: the data options.
        train_samples / eval_samples: ``pretrain`` only: sequences that will be drawn (sizes
            megatron-core's GPTDataset and blend); ignored for ``sft``, whose epochs are defined
            by the data.

    Returns:
        :class:`Data` with the train and eval datasets, the Hugging Face tokenizer and a report.
    """
    from megatron_ift.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer_path)
    if cfg.format == "sft":
        from megatron_ift.data.sft import build_sft

        train, evaluation, report = _rank0_first(lambda: build_sft(cfg, tokenizer))
    else:
        from megatron_ift.data.indexed import build_pretrain

        # megatron-core's builder already builds on rank 0 first and synchronises the others.
        train, evaluation, report = build_pretrain(
            cfg, train_samples=train_samples, eval_samples=eval_samples
        )
    return Data(config=cfg, train=train, eval=evaluation, tokenizer=tokenizer, report=report)
