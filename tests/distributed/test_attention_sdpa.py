"""Fused SDPA core attention (``models/attention.py``) equals megatron-core's local
``DotProductAttention`` in a whole GPT model: logits and every gradient, float64 to 1e-10 and
float32 to 1e-5 (relative to the largest entry), packed and unpacked rows, TP 1, TP 2, TP 2 + SP."""
import json

import pytest
from _infra.launch import torchrun

TOL = {"float64": 1e-10, "float32": 1e-5}


@pytest.mark.dist
def test_sdpa_equals_local_attention_at_tp1_tp2_sp(tmp_path):
    out = tmp_path / "attn.json"
    torchrun("perf_attention_tp.py", 2, str(out), timeout=300)
    res = json.loads(out.read_text())
    assert set(res) == {"tp1", "tp2", "tp2_sp"}
    for layout, r in res.items():
        for name, e in r.items():
            if name == "dropout_train_vs_eval":
                assert e > 1e-3, (layout, e)  # dropout acts in training mode
                continue
            tol = TOL[name.split("_")[0]]
            assert e["sdpa_modules"] == 4 and e["sdpa_in_local"] == 0, (layout, name, e)
            assert e["num_grads"] > 10, (layout, name, e)
            assert e["logit_err"] <= tol * max(1.0, e["logit_scale"]), (layout, name, e)
            assert e["grad_rel_err"] <= tol, (layout, name, e)
