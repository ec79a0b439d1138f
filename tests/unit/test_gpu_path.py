"""The GPU path's pieces on CPU: the emulated CUDA device's own checks, the host-sync budget of a
step, the THD / dense-mask choice for packed rows, and hardware refusals (fusion selection:
tests/unit/test_platform.py)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from _infra.launch import ROOT

from megatron_ift.data.packing import cu_seqlens
from megatron_ift.validation import ConfigError


def _packed_row():
    from megatron_ift.data.collate import assemble_row, collate

    row = assemble_row([(torch.arange(1, 5).numpy(), torch.tensor([0, 0, 1, 1]).numpy()),
                        (torch.arange(5, 8).numpy(), torch.tensor([0, 1, 1]).numpy())],
                       10, 0, 7, packed=True)
    return collate([row])


def test_cu_seqlens_cover_every_segment_and_padding():
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 2, 2]])
    assert cu_seqlens(seg).tolist() == [0, 4, 7, 10, 12, 18, 20]
    assert cu_seqlens(seg).dtype == torch.int32


def test_thd_for_packed_rows_on_te_dense_mask_on_local():
    from megatron_ift.training.microbatch import MicroBatch

    batch = _packed_row()
    thd = MicroBatch.prepare(batch, 0, torch.device("cpu"), thd=True)
    local = MicroBatch.prepare(batch, 0, torch.device("cpu"), thd=False)
    psp = thd.packed_seq_params
    assert psp.qkv_format == "thd"
    assert psp.cu_seqlens_q.tolist() == [0, 4, 7, 10] and psp.max_seqlen_q == 4
    assert thd.attention_mask() is None  # THD rows: TE's kernels keep the segments apart
    assert local.packed_seq_params is None and local.attention_mask().shape == (1, 1, 10, 10)
    unpacked = dataclasses.replace(batch, segment_ids=None)
    for flag in (True, False):  # unpacked rows: megatron-core's causal mask type, no mask tensor
        ready = MicroBatch.prepare(unpacked, 0, torch.device("cpu"), thd=flag)
        assert ready.packed_seq_params is None and ready.attention_mask() is None


def test_prepared_metadata_is_computed_on_the_host():
    from megatron_ift.ift import Groups
    from megatron_ift.training.microbatch import MicroBatch

    batch = _packed_row()
    ready = MicroBatch.prepare(batch, 0, torch.device("cpu"), thd=False)
    want = Groups.build(batch.loss_mask, batch.segment_ids)
    assert ready.groups.num == want.num == 3
    assert torch.equal(ready.groups.index, want.index)
    assert ready.selection.rows.numel() == int(batch.loss_mask.sum())
    assert torch.equal(ready.output_positions, ready.selection.seq_first_index())
    assert ready.index == 0


def _run_config(**sections):
    from megatron_ift.training.config import load_run_config

    overrides = [f"{k}={v}" for k, v in sections.items()]
    return load_run_config(os.path.join(ROOT, "configs", "demo.yaml"), overrides)


def test_nccl_without_a_gpu_is_refused_before_building():
    from megatron_ift.platform import Platform
    from megatron_ift.training.preflight import check_platform

    cfg = _run_config(**{"parallel.backend": "nccl"})
    with pytest.raises(ConfigError, match="parallel.backend=nccl"):
        check_platform(cfg, Platform())


def test_packed_thd_needs_micro_batch_one():
    from megatron_ift.platform import Kernels, Platform
    from megatron_ift.training.preflight import check_platform

    te = Platform(kind="cuda", device=torch.device("cuda", 0), kernels=Kernels(transformer_engine=True))
    cfg = _run_config(**{"model.transformer_impl": "transformer_engine", "model.attention_backend": "auto"})
    with pytest.raises(ConfigError, match="train.micro_batch_size=1"):
        check_platform(cfg, te)
    check_platform(_run_config(**{"model.transformer_impl": "transformer_engine", "train.micro_batch_size": 1,
                                  "model.attention_backend": "auto"}), te)


def test_packed_rows_with_context_parallelism_on_te_need_padded_segments():
    """TE splits each THD sequence over the context-parallel ranks: the SFT packer pads every
    segment to a multiple of 2 x cp; packed pretraining documents are not padded (refused)."""
    from megatron_ift.platform import Kernels, Platform
    from megatron_ift.training.preflight import check_platform

    te = Platform(kind="cuda", device=torch.device("cuda", 0), kernels=Kernels(transformer_engine=True))
    over = {"model.transformer_impl": "transformer_engine", "model.attention_backend": "auto",
            "train.micro_batch_size": 1, "parallel.context_parallel_size": 2}
    check_platform(_run_config(**over), te)
    check_platform(_run_config(**over, **{"data.segment_multiple": 8}), te)
    pretrain = {"data.format": "pretrain", "data.paths": "[data/x]"}
    with pytest.raises(ConfigError, match="data.format=pretrain with data.packing=true, "
                                          "parallel.context_parallel_size=2 and model.transformer_impl"):
        check_platform(_run_config(**over, **pretrain), te)
    check_platform(_run_config(**over, **pretrain, **{"data.packing": "false"}), te)
    check_platform(_run_config(**dict(over, **pretrain, **{"model.transformer_impl": "local"})), te)


def test_packed_rows_on_megatrons_local_attention_use_the_masked_softmax_kernel(monkeypatch):
    """Review finding 5: megatron-core's fused softmax with the local spec's ``causal`` mask type
    takes the upper-triangular kernel, which never reads the block mask of packed rows. Packed
    rows declare an ``arbitrary`` mask, which takes the masked kernel (kernel availability is
    forced here: the CUDA kernels themselves cannot run on a CPU)."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    from megatron_ift.models.config import ModelConfig
    from megatron_ift.models.gpt import local_layer_spec

    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=60,
                        attention_backend="local")
    mask_type = lambda packed: local_layer_spec(model, packed).submodules.self_attention.params["attn_mask_type"]  # noqa: E731
    assert mask_type(False) == AttnMaskType.causal  # unpacked: no mask tensor, the causal kernel
    assert mask_type(True) == AttnMaskType.arbitrary
    auto = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=60)
    assert local_layer_spec(auto, True).submodules.self_attention.submodules.core_attention.__name__ == "SDPAttention"

    used = []
    monkeypatch.setattr(fused_softmax.ScaledUpperTriangMaskedSoftmax, "apply",
                        lambda x, scale: used.append("upper_triangular") or x)
    monkeypatch.setattr(fused_softmax.ScaledMaskedSoftmax, "apply",
                        lambda x, mask, scale: used.append("masked") or x)
    monkeypatch.setattr(fused_softmax.FusedScaleMaskSoftmax, "is_kernel_available", lambda *a: True)
    scores = torch.zeros(1, 4, 32, 32, dtype=torch.bfloat16)
    block = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    for packed in (False, True):
        softmax = fused_softmax.FusedScaleMaskSoftmax(
            input_in_fp16=False, input_in_bf16=True, attn_mask_type=mask_type(packed),
            scaled_masked_softmax_fusion=True, mask_func=attention_mask_func, softmax_in_fp32=True,
            scale=None)
        softmax(scores, block)
    assert used == ["upper_triangular", "masked"]  # the causal type would ignore the block mask
