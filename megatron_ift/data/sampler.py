"""Deterministic, resumable, data-parallel sample order.

The order of epoch ``e`` is a permutation that depends only on ``(seed, e)`` (or the identity
without shuffling). It is cut into *global batches* of ``G = micro_batch_size x num_microbatches
x dp_size`` samples; micro-step ``j`` of a global batch covers its ``mbs x dp`` samples
``[j * mbs * dp, (j + 1) * mbs * dp)``, of which data-parallel rank ``r`` takes
``[r * mbs, (r + 1) * mbs)`` (megatron's layout). So every rank gets its slice of every global
batch, and the union over ranks and micro-steps is exactly the global batch.

``drop_last`` (training) drops an epoch's incomplete last global batch; without it (evaluation)
the last batch is completed with ``-1`` entries, which the iterator turns into empty rows.

The state is ``(epoch, samples consumed in the epoch)``, counted over all ranks. Restoring it
resumes exactly at the next micro-batch; it may even be restored under another data-parallel
size or micro-batch size, as long as the consumed count falls on a micro-step boundary of the
new layout (a checkpoint saved after an optimizer step always does when ``G`` is unchanged).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from megatron_ift.validation import ConfigError, check_positive_int

PAD_INDEX = -1


class ResumableSampler:
    """Indices of this data-parallel rank's micro-batches, epoch after epoch.

    Args:
        num_samples: size of the dataset being sampled.
        dp_rank / dp_size: this rank and the data-parallel world.
        micro_batch_size: samples per micro-batch per rank.
        num_microbatches: micro-batches per optimizer step (gradient accumulation).
        seed: order seed.
        shuffle: permute each epoch (else the dataset order).
        drop_last: drop each epoch's incomplete last global batch; else pad it with ``-1``.
        num_epochs: stop after this many epochs (None: never).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        num_microbatches: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_epochs: Optional[int] = None,
    ) -> None:
        check_positive_int("num_samples", num_samples)
        check_positive_int("dp_size", dp_size)
        check_positive_int("micro_batch_size", micro_batch_size)
        check_positive_int("num_microbatches", num_microbatches)
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_epochs is not None:
            check_positive_int("num_epochs", num_epochs)
        self.num_samples = num_samples
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch_size, self.num_microbatches = micro_batch_size, num_microbatches
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_epochs = num_epochs
        if drop_last and num_samples < self.global_batch_size:
            raise ConfigError(
                f"the dataset has {num_samples} samples (rows), fewer than one global batch of "
                f"{self.global_batch_size} = micro_batch_size {micro_batch_size} x "
                f"num_microbatches {num_microbatches} x dp_size {dp_size}"
            )
        self.epoch = 0
        self.consumed = 0  # samples of this epoch consumed by all ranks together
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp_size

    @property
    def step_size(self) -> int:
        """Samples consumed by all ranks in one micro-step."""
        return self.micro_batch_size * self.dp_size

    @property
    def global_batches_per_epoch(self) -> int:
        g = self.global_batch_size
        return self.num_samples // g if self.drop_last else -(-self.num_samples // g)

    @property
    def samples_per_epoch(self) -> int:
        """Slots consumed per epoch, over all ranks (padding slots included)."""
        return self.global_batches_per_epoch * self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """``[num_samples]`` dataset indices in epoch ``epoch``'s order (from seed, epoch only)."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return (
            np.random.default_rng([self.seed, epoch]).permutation(self.num_samples).astype(np.int64)
        )

    def _order_of(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        return self._order

    def finished(self) -> bool:
        return self.num_epochs is not None and self.epoch >= self.num_epochs

    def next_indices(self) -> np.ndarray:
        """This rank's next micro-batch: ``[micro_batch_size]`` dataset indices (``-1`` = pad).

        Raises:
            StopIteration: after ``num_epochs`` epochs.
        """
        if self.finished():
            raise StopIteration
        order = self._order_of(self.epoch)
        start = self.consumed + self.dp_rank * self.micro_batch_size
        idx = np.full(self.micro_batch_size, PAD_INDEX, dtype=np.int64)
        take = order[start : start + self.micro_batch_size]
        idx[: take.size] = take
        self.consumed += self.step_size
        if self.consumed >= self.samples_per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0
        return idx

    def __iter__(self) -> Iterator[np.ndarray]:
        while not self.finished():
            yield self.next_indices()

    def state_dict(self) -> dict[str, Any]:
        """Position and identity of the order (plain ints/bools: any checkpoint format holds it)."""
        return {
            "epoch": self.epoch,
            "consumed_samples_in_epoch": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``.

        Raises:
            ValueError: the state belongs to another dataset, seed or shuffling, or does not fall
                on a micro-step boundary of this layout.
        """
        for key in ("seed", "num_samples", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{getattr(self, key)!r}: the data or its options changed since the checkpoint"
                )
        consumed = int(state["consumed_samples_in_epoch"])
        if consumed % self.step_size or consumed >= self.samples_per_epoch:
            raise ValueError(
                f"sampler state consumed {consumed} samples of the epoch, which is not a "
                f"micro-step boundary of micro_batch_size x dp_size = {self.step_size} within "
                f"{self.samples_per_epoch} samples per epoch"
            )
        self.epoch, self.consumed = int(state["epoch"]), consumed
