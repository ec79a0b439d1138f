"""The platform decision (megatron_ift.platform) and what is decided from it: fusions, kernels,
host-sync discipline, and that no other module asks torch for CUDA or patches at import."""
import pathlib

import pytest
import torch
from _infra import ROOT as INFRA_ROOT

from megatron_ift.models.fusions import fusion_settings, missing_kernel_warnings
from megatron_ift.platform import Kernels, Platform

ROOT = pathlib.Path(INFRA_ROOT)

CPU = Platform()

TE_ONLY = Platform(kind="cuda", device=torch.device("cuda", 0), kernels=Kernels(transformer_engine=True))

TE_APEX = Platform(kind="cuda", device=torch.device("cuda", 0),
                   kernels=Kernels(transformer_engine=True, apex_gradient_accumulation=True,
                                   megatron_softmax=True))

BARE_GPU = Platform(kind="cuda", device=torch.device("cuda", 0))


def test_platform_facts():
    assert not CPU.cuda and CPU.backend == "gloo" and CPU.device == torch.device("cpu")
    assert TE_ONLY.cuda and TE_ONLY.real_cuda and TE_ONLY.backend == "nccl"
    emulated = Platform(kind="emulated_cuda", device=torch.device("cuda", 0))
    assert emulated.cuda and emulated.emulated and not emulated.real_cuda
    assert Kernels.detect(lambda name: name == "transformer_engine") == Kernels(transformer_engine=True)
    # megatron's softmax fusion needs both of its extensions
    assert not Kernels.detect(lambda name: name == "scaled_masked_softmax_cuda").megatron_softmax


def test_cpu_turns_every_fusion_off():
    flags = fusion_settings(CPU, "local", gated=True, bias=True)
    assert not any(flags.values())
    assert missing_kernel_warnings(CPU, "local") == []


def test_gradient_accumulation_fusion_follows_apex_not_transformer_engine():
    """Review finding 1: the output layer is always megatron-core's ColumnParallelLinear, which
    needs apex's fused_weight_gradient_mlp_cuda; a TE container without apex must not ask for it."""
    te_only = fusion_settings(TE_ONLY, "transformer_engine", gated=True, bias=False)
    assert te_only["gradient_accumulation_fusion"] is False
    assert te_only["apply_rope_fusion"] is True
    assert fusion_settings(TE_APEX, "transformer_engine", gated=True, bias=False)["gradient_accumulation_fusion"]
    warnings = missing_kernel_warnings(TE_ONLY, "transformer_engine")
    assert len(warnings) == 1 and "fused_weight_gradient_mlp_cuda" in warnings[0]


def test_bias_free_gelu_does_not_ask_for_bias_activation_fusion():
    """Review finding 7: megatron-core's TransformerConfig rejects bias_activation_fusion for a
    bias-free GeLU MLP; SwiGLU (gated) fuses without biases."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    assert fusion_settings(BARE_GPU, "local", gated=False, bias=False)["bias_activation_fusion"] is False
    assert fusion_settings(BARE_GPU, "local", gated=False, bias=True)["bias_activation_fusion"] is True
    assert fusion_settings(BARE_GPU, "local", gated=True, bias=False)["bias_activation_fusion"] is True
    with pytest.raises(ValueError):  # the upstream rule the decision follows
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                          activation_func=torch.nn.functional.gelu, add_bias_linear=False,
                          bias_activation_fusion=True)


def test_once_per_step_lifts_torch_sync_debug_mode_on_a_real_gpu(monkeypatch):
    """Review finding 2: megatron-core's finalize_model_grads reads the token count on the host
    inside the optimisation pass; with MEGATRON_IFT_SYNC_DEBUG=1 on a real GPU that region runs
    under torch's sync debug mode "error", so the once-per-step call must lift it."""
    modes = []
    state = {"mode": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: state.update(mode=m))
    monkeypatch.setenv("MEGATRON_IFT_SYNC_DEBUG", "1")

    def finalize():
        modes.append(state["mode"])

    wrapped = BARE_GPU.once_per_step(finalize)
    with BARE_GPU.no_host_sync("the loop"):
        assert state["mode"] == "error"
        wrapped()
        assert state["mode"] == "error"
    assert modes == [0] and state["mode"] == 0


def test_cuda_is_asked_only_by_the_platform_module():
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "megatron_ift").rglob("*.py")
            if "torch.cuda.is_available()" in p.read_text().replace("``torch.cuda.is_available()``", "")]
    assert hits == ["megatron_ift/platform.py"]
