"""Tiny helpers for optional process groups: a ``None`` group or a world of one is local."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]


def group_rank_world(group: ProcessGroup) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; (0, 1) without distributed/group."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup) -> torch.Tensor:
    """In-place all-reduce over ``group``; a no-op for a world of one."""
    if group_rank_world(group)[1] > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
