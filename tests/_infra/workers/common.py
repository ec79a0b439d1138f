"""Shared set-up for spawned test workers: the platform, process groups, a tiny model.

Importing this module bootstraps the worker's platform (the CPU layer, or the emulated CUDA
device with ``MEGATRON_IFT_EMULATE_CUDA=1``): a worker is an entry point. ``PLATFORM`` is it.
"""

from __future__ import annotations

import json

from megatron_ift.platform import bootstrap

PLATFORM = bootstrap()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_ift.data.batch import Batch  # noqa: E402
from megatron_ift.distributed import init_distributed, model_parallel_seed  # noqa: E402
from megatron_ift.models.config import ModelConfig  # noqa: E402
from megatron_ift.parallel import ParallelConfig  # noqa: E402


def tiny_model(**overrides) -> ModelConfig:
    kw = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, vocab_size=60, make_vocab_size_divisible_by=16,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def setup(tp=1, pp=1, vpp=None, sp=False, seed=1234, **kw) -> ParallelConfig:
    par = ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp, **kw,
    )
    init_distributed(par, PLATFORM)
    model_parallel_seed(seed, PLATFORM)
    return par


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def dump(path: str, obj) -> None:
    if rank() == 0:
        with open(path, "w") as f:
            json.dump(obj, f)


def make_global_batch(num_samples: int, seq: int, vocab: int, seed: int = 0, packed: bool = False,
                      multi_turn: bool = False):
    """A deterministic global batch of SFT-style samples: random prompt lengths, answer masks.

    Args:
        packed: every row holds two samples and a padding segment (``segment_ids``; positions
            restart per segment; a segment's last position trains nothing, its label being the
            next segment's first token), as :mod:`megatron_ift.data.packing` builds them.

    Returns a :class:`~megatron_ift.data.batch.Batch` of ``num_samples`` rows (Megatron
    convention: labels = tokens shifted left, loss_mask over labels).
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (num_samples, seq + 1), generator=g)
    loss_mask = torch.zeros(num_samples, seq)
    segment_ids = torch.zeros(num_samples, seq, dtype=torch.long)
    position_ids = torch.arange(seq).repeat(num_samples, 1)
    for i in range(num_samples):
        if not packed:
            prompt = int(torch.randint(1, seq // 2, (1,), generator=g))
            end = seq - int(torch.randint(0, 3, (1,), generator=g))
            loss_mask[i, prompt - 1 : end - 1] = 1.0
            if multi_turn:  # a second user turn in the middle of the answer
                gap = int(torch.randint(prompt + 1, max(prompt + 2, end - 3), (1,), generator=g))
                loss_mask[i, gap : min(gap + 3, end - 2)] = 0.0
            continue
        end = seq - int(torch.randint(0, 3, (1,), generator=g))
        cut = int(torch.randint(seq // 3, 2 * seq // 3, (1,), generator=g))
        spans = [(0, cut), (cut, end)] + ([(end, seq)] if end < seq else [])  # padding last
        for j, (lo, hi) in enumerate(spans):
            segment_ids[i, lo:hi] = j
            position_ids[i, lo:hi] = torch.arange(hi - lo)
            if hi <= end:  # a sample: prompt, then answer up to its last position
                prompt = int(torch.randint(1, max(2, (hi - lo) // 2), (1,), generator=g))
                loss_mask[i, lo + prompt - 1 : hi - 1] = 1.0
    if num_samples > 1:
        loss_mask[1] = 0.0  # an all-prompt row: n = 0
    return Batch(
        tokens=tokens[:, :-1].contiguous(),
        labels=tokens[:, 1:].contiguous(),
        loss_mask=loss_mask,
        position_ids=position_ids,
        sample_ids=torch.arange(num_samples),
        segment_ids=segment_ids if packed else None,
    )


def split_microbatches(batch, dp_rank: int, dp_size: int, mbs: int):
    """This DP rank's micro-batches: the global batch is split into contiguous DP slices."""
    per_rank = batch.shape[0] // dp_size
    lo = dp_rank * per_rank
    return [batch.rows(start, start + mbs) for start in range(lo, lo + per_rank, mbs)]


def save_grads_as_model(chunks, path: str) -> None:
    """Save each parameter's gradient (``main_grad`` or ``grad``) in the model's own sharded
    layout, so a single process can load it back at TP1/PP1 and compare."""
    from megatron_ift.checkpoint.model_io import save_model, unwrap

    saved = []
    for c in chunks:
        for p in unwrap(c).parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
            saved.append((p, p.data.clone()))
            p.data.copy_(g)
    save_model(chunks, path)
    for p, d in saved:
        p.data.copy_(d)
