"""Stream tensors into and out of megatron-core distributed checkpoints (``torch_dist`` format).

Writing: :func:`save_streaming` goes through ``megatron.core.dist_checkpointing.save`` (so the
checkpoint has megatron-core's own ``metadata.json``, ``common.pt`` and key layout) with
:class:`StreamingSaveStrategy`. Its sharded state dict holds *meta* tensors, which carry only
shapes and dtypes; the tensor data are produced one write item at a time by a callback when
torch's ``FileSystemWriter`` asks the planner for them, and written before the next one is made.
(megatron-core's default writer resolves every tensor up front, which would hold the whole model.)

Reading: :class:`DistCheckpointReader` loads one global tensor, or one layer's slice of a stacked
``[num_layers, ...]`` tensor, at a time through megatron-core's ``torch_dist`` load path, whatever
tensor/pipeline layout wrote the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from megatron_ift.convert import ConversionError

# (sharded key, global offset of the chunk) -> the chunk's tensor
Producer = Callable[[str, tuple[int, ...]], torch.Tensor]


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo world of one for dist_checkpointing (which needs torch.distributed).

    Reuses an existing world of size one; refuses a larger one (conversion is single-process).
    """
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                "checkpoint conversion runs in a single process; launch it with python, not "
                f"torchrun (world size is {dist.get_world_size()})"
            )
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def meta_sharded_tensor(
    key: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layer: Optional[int] = None,
    num_layers: Optional[int] = None,
) -> ShardedTensor:
    """A data-less ShardedTensor: a whole tensor, or layer ``layer`` of a ``[num_layers, ...]`` one.

    The layer slice is a ``[1, ...]`` chunk at offset ``layer`` of axis 0, which is how
    megatron-core stores the layers of a homogeneous ``TransformerBlock``.
    """
    if layer is None:
        return ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype, device="meta"),
                                               replica_id=0)
    data = torch.empty((1, *shape), dtype=dtype, device="meta")
    return ShardedTensor.from_rank_offsets(key, data, (0, layer, num_layers), replica_id=0)


def layer_extra_state(key: str, layer: int, num_layers: int) -> ShardedObject:
    """The (empty) ``_extra_state`` object of one layer's linear module, as our models save it."""
    return ShardedObject(key, None, (num_layers,), (layer,), replica_id=0)


class _StreamingSavePlanner(MCoreSavePlanner):
    """Produces each tensor when the writer asks for it instead of looking it up."""

    def __init__(self, produce: Producer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._produce = produce

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        offset = tuple(write_item.index.offset)
        tensor = self._produce(write_item.index.fqn, offset)
        sizes = tuple(write_item.tensor_data.chunk.sizes)
        dtype = write_item.tensor_data.properties.dtype
        if tuple(tensor.shape) != sizes or tensor.dtype != dtype:
            raise ConversionError(
                f"internal error: produced {write_item.index.fqn}@{offset} as {tensor.dtype} "
                f"{tuple(tensor.shape)}, planned {dtype} {sizes}"
            )
        return tensor


class StreamingSaveStrategy(SaveShardedStrategy):
    """megatron-core ``torch_dist`` save strategy whose tensors come from a producer callback.

    The sharded state dict passed to ``dist_checkpointing.save`` holds meta tensors (shapes and
    dtypes only). torch's ``FileSystemWriter`` with one thread resolves, serialises and drops one
    item at a time, so memory stays at the largest item (times the small constant of the
    producer's own copies).
    """

    def __init__(self, produce: Producer) -> None:
        super().__init__("torch_dist", 1)
        self._produce = produce

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict, checkpoint_dir: Any) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        pyt_state_dict = mcore_to_pyt_state_dict(flat, is_loading=False)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1,
                                  sync_files=True)
        dcp.save(pyt_state_dict, storage_writer=writer,
                 planner=_StreamingSavePlanner(self._produce, flatten_state_dict=False))


def save_streaming(sharded_state_dict: dict, checkpoint_dir: str, produce: Producer) -> None:
    """``dist_checkpointing.save`` of a meta-tensor state dict with data from ``produce``."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict, checkpoint_dir,
                            sharded_strategy=StreamingSaveStrategy(produce))


class DistCheckpointReader:
    """Read tensors of a megatron-core ``torch_dist`` checkpoint one at a time.

    Needs torch.distributed (see :func:`single_process_group`).

    Args:
        checkpoint_dir: the ``iter_*`` folder.
    """

    def __init__(self, checkpoint_dir: str) -> None:
        config_path = os.path.join(checkpoint_dir, "metadata.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                backend = json.load(f).get("sharded_backend")
        except (OSError, json.JSONDecodeError) as exc:
            raise ConversionError(
                f"{checkpoint_dir} is not a megatron-core distributed checkpoint ({config_path} "
                f"unreadable: {exc})"
            ) from exc
        if backend != "torch_dist":
            raise ConversionError(
                f"{checkpoint_dir} uses the {backend!r} dist_checkpointing backend; only "
                "'torch_dist' (megatron-core's default) is supported"
            )
        self.checkpoint_dir = checkpoint_dir
        self._reader = CachedMetadataFileSystemReader(checkpoint_dir)
        self._metadata = self._reader.read_metadata()

    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Global shape and dtype of every tensor key."""
        return {
            key: (tuple(md.size), md.properties.dtype)
            for key, md in self._metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The whole tensor ``key``, or its slice ``layer`` along axis 0 (without that axis)."""
        md = self._metadata.state_dict_metadata[key]
        shape, dtype = tuple(md.size), md.properties.dtype
        if layer is None:
            target = torch.empty(shape, dtype=dtype)
            sh_ten = ShardedTensor.from_rank_offsets(key, target, replica_id=0)
        else:
            target = torch.empty((1, *shape[1:]), dtype=dtype)
            sh_ten = ShardedTensor.from_rank_offsets(key, target, (0, layer, shape[0]),
                                                     replica_id=0)
        pyt_state_dict = mcore_to_pyt_state_dict({key: [sh_ten]}, is_loading=True)
        dcp.load(pyt_state_dict, storage_reader=self._reader,
                 planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=[sh_ten]))
        return target if layer is None else target[0]
