"""The multi-tensor helpers' contracts (TE's ``multi_tensor_applier``): an op called as
``op(chunk_size, noop_flag, tensor_lists, *args)``."""

from __future__ import annotations

import torch


class _Applier:
    chunk_size = 2048 * 32

    def __call__(self, op, noop_flag_buffer, tensor_lists, *args):
        return op(self.chunk_size, noop_flag_buffer, tensor_lists, *args)


multi_tensor_applier = _Applier()


def multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor: bool, *args):
    """``(total L2 norm, per-tensor norms)`` of ``tensor_lists[0]`` (fp32)."""
    tensors = tensor_lists[0]
    if not tensors:
        zero = torch.zeros(1, dtype=torch.float32, device=noop_flag.device)
        return zero, zero
    norms = torch.stack([t.detach().float().norm() for t in tensors])
    total = norms.pow(2).sum().sqrt().reshape(1)
    return total, (norms if per_tensor else torch.zeros(0, device=total.device))


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale: float):
    """``out = in * scale`` for ``tensor_lists = [ins, outs]``; sets ``noop_flag`` where a
    value is not finite."""
    ins, outs = tensor_lists
    for src, dst in zip(ins, outs):
        scaled = src.float() * scale
        if not torch.isfinite(scaled).all():
            noop_flag.fill_(1)
        dst.copy_(scaled.to(dst.dtype))
