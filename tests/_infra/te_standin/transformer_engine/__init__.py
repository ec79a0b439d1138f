"""megatron-ift's stand-in for NVIDIA Transformer Engine: a test tool, never shipped.

The subset of ``transformer_engine.pytorch`` that megatron-core 0.16.1's TE extension and layer
spec use, in plain PyTorch, written from TE's documented behaviour (its sources on GitHub,
NVIDIA/TransformerEngine, release 2.8): linear / layer-norm-linear / norm modules with TE's
tensor- and sequence-parallel communication, ``DotProductAttention`` (sbhd / bshd / thd, causal
and padding masks, context parallelism), FP8 autocast with the delayed and current scaling
recipes emulated by quantize-dequantize through torch's float8 dtypes, and FusedAdam's state
contract. It enforces the input rules TE documents (int32 ``cu_seqlens`` on the device, FP8
GEMM dimensions, dtypes), so a call TE would reject fails here too.

What it proves: megatron-core's TE code paths run and our trainer drives them correctly (calls,
shapes, process groups, state contracts). What it does not: TE's kernels, their numerics
(FP8 here is quantize-dequantize in the compute dtype), NCCL, userbuffers overlap, speed or GPU
memory. Use: ``PYTHONPATH=tests/_infra/te_standin MEGATRON_IFT_EMULATE_CUDA=1 megatron-ift ...``
(tests/_infra/te_standin/README.md).
"""

__version__ = "2.8.0"
STANDIN = True
"""Marks this package as megatron-ift's stand-in (tools and reports name what ran)."""

from transformer_engine import common, pytorch  # noqa: F401
