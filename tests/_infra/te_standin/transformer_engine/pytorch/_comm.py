"""Tensor- and sequence-parallel communication of TE's linear layers (autograd functions)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


class _AllGatherSeq(torch.autograd.Function):
    """Forward: all-gather along dim 0 (sequence parallel -> full); backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = world(group)
        out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = world(ctx.group)
        out = torch.empty((grad.shape[0] // n,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class _ReduceScatterSeq(torch.autograd.Function):
    """Forward: reduce-scatter along dim 0 (row-parallel output -> sequence shard); backward:
    all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = world(group)
        if x.shape[0] % n:
            raise ValueError(f"sequence-parallel reduce-scatter: dim 0 ({x.shape[0]}) not divisible by {n}")
        out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = world(ctx.group)
        out = torch.empty((n * grad.shape[0],) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.all_gather_into_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class _AllReduce(torch.autograd.Function):
    """Forward: all-reduce (row-parallel output); backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToTP(torch.autograd.Function):
    """Forward: identity (column-parallel input); backward: all-reduce of the input gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_sequence(x, group):
    return _AllGatherSeq.apply(x, group) if world(group) > 1 else x


def scatter_sequence(x, group):
    return _ReduceScatterSeq.apply(x, group) if world(group) > 1 else x


def all_reduce(x, group):
    return _AllReduce.apply(x, group) if world(group) > 1 else x


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group) if world(group) > 1 else x
