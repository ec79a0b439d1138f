"""FP8Config validation, its megatron-core mapping, and the support check's error messages.

No GPU here: the GPU/TE branches of check_fp8_supported are driven by the platform it is given
(TE present, a CUDA device) and by monkeypatching what it queries (the compute capability, TE's
version and verdict).
"""

import sys
import types
import warnings

import pytest
import torch

from megatron_ift.models.fp8 import (
    FP8Config,
    FP8UnsupportedError,
    check_fp8_supported,
    fp8_transformer_config_kwargs,
)
from megatron_ift.platform import Kernels, Platform
from megatron_ift.validation import ConfigError

CPU = Platform()
NO_TE_GPU = Platform(kind="cuda", device=torch.device("cuda", 0))
TE_CPU = Platform(kernels=Kernels(transformer_engine=True))  # TE installed, no GPU visible
TE_GPU = Platform(kind="cuda", device=torch.device("cuda", 0), kernels=Kernels(transformer_engine=True))


def _transformer_config(**kwargs):
    warnings.filterwarnings("ignore")
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=8, hidden_size=64, num_attention_heads=4, **kwargs)


def test_disabled_maps_to_no_fp8_and_needs_nothing():
    cfg = FP8Config()
    assert fp8_transformer_config_kwargs(cfg) == {"fp8": None}
    check_fp8_supported(cfg, CPU)  # no TE, no GPU: must not raise when disabled
    assert _transformer_config(**fp8_transformer_config_kwargs(cfg)).fp8 is None


def test_enabled_kwargs_are_accepted_by_megatron_core():
    cfg = FP8Config(enabled=True, recipe="tensorwise", format="e4m3",
                    first_last_layers_bf16=True, num_layers_at_start_in_bf16=2,
                    num_layers_at_end_in_bf16=3, margin=1, wgrad=False, param_gather=True)
    tc = _transformer_config(**fp8_transformer_config_kwargs(cfg))
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_margin, tc.fp8_wgrad, tc.fp8_param) == (
        "e4m3", "tensorwise", 1, False, True)
    assert (tc.first_last_layers_bf16, tc.num_layers_at_start_in_bf16,
            tc.num_layers_at_end_in_bf16) == (True, 2, 3)
    delayed = FP8Config(enabled=True, recipe="delayed", amax_history_len=16,
                        amax_compute_algo="most_recent")
    tc = _transformer_config(**fp8_transformer_config_kwargs(delayed))
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (
        "hybrid", "delayed", 16, "most_recent")


def test_too_many_bf16_layers_is_caught_by_megatron_core():
    # Our config cannot know the stage size; megatron-core checks it against the layout.
    cfg = FP8Config(enabled=True, first_last_layers_bf16=True, num_layers_at_start_in_bf16=9)
    with pytest.raises(ValueError, match="num_layers_at_start_in_bf16"):
        _transformer_config(**fp8_transformer_config_kwargs(cfg))


@pytest.mark.parametrize("kwargs, field", [
    (dict(recipe="mxfp8"), "fp8.recipe"),
    (dict(format="e5m2"), "fp8.format"),
    (dict(amax_compute_algo="mean"), "fp8.amax_compute_algo"),
    (dict(num_layers_at_end_in_bf16=-1), "fp8.num_layers_at_end_in_bf16"),
    (dict(amax_history_len=0), "fp8.amax_history_len"),
    (dict(enabled=True, recipe="delayed", first_last_layers_bf16=True), "recipe=tensorwise"),
    (dict(param_gather=True), "fp8.enabled=true"),
])
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        FP8Config(**kwargs)


def test_config_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        FP8Config(True)  # noqa - positional on purpose
    with pytest.raises(AttributeError):
        FP8Config().enabled = True


# ---- check_fp8_supported: each failure names its fix ---------------------------------------

@pytest.fixture
def fake_te(monkeypatch):
    """Make Transformer Engine look installed, with a settable version and FP8 verdict."""
    te = types.ModuleType("transformer_engine")
    te.__version__ = "2.5.0"
    te_pt = types.ModuleType("transformer_engine.pytorch")
    te_fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
    te_fp8.check_fp8_support = lambda: (True, "")
    for name, module in (("transformer_engine", te), ("transformer_engine.pytorch", te_pt),
                         ("transformer_engine.pytorch.fp8", te_fp8)):
        monkeypatch.setitem(sys.modules, name, module)
    return te, te_fp8


def _fake_gpu(monkeypatch, capability, name="NVIDIA Test GPU"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


ON = FP8Config(enabled=True)


def test_without_transformer_engine_names_the_install():
    with pytest.raises(FP8UnsupportedError, match=r"pip install 'megatron-ift\[gpu\]'"):
        check_fp8_supported(ON, NO_TE_GPU)


def test_without_gpu_names_the_hardware(fake_te):
    with pytest.raises(FP8UnsupportedError, match="needs a CUDA GPU.*8.9.*fp8.enabled=false"):
        check_fp8_supported(ON, TE_CPU)


def test_old_gpu_reports_its_capability(fake_te, monkeypatch):
    _fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(FP8UnsupportedError, match=r"A100-SXM4-80GB has compute capability 8\.0"):
        check_fp8_supported(ON, TE_GPU)


def test_tensorwise_needs_a_recent_transformer_engine(fake_te, monkeypatch):
    te, _ = fake_te
    te.__version__ = "1.13.0"
    _fake_gpu(monkeypatch, (9, 0))
    with pytest.raises(FP8UnsupportedError, match=r">= 2\.2, found 1\.13\.0.*recipe=delayed"):
        check_fp8_supported(ON, TE_GPU)
    check_fp8_supported(FP8Config(enabled=True, recipe="delayed"), TE_GPU)  # delayed works on TE 1.x


def test_transformer_engine_verdict_is_reported(fake_te, monkeypatch):
    _, te_fp8 = fake_te
    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    check_fp8_supported(ON, TE_GPU)  # Hopper + TE 2.5 + a positive verdict: supported
    te_fp8.check_fp8_support = lambda: (False, "CUDA driver too old")
    with pytest.raises(FP8UnsupportedError, match="CUDA driver too old"):
        check_fp8_supported(ON, TE_GPU)
