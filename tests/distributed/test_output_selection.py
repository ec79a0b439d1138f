"""The model's output at chosen positions (``models/ift_model.py``, ``training/microbatch.py``):
the embedding stage equals megatron-core's bit for bit; selected logits equal the full forward's;
differentiable for the optimisation pass (loss and every gradient equal the full-logits path:
1e-10 / 1e-12 in float64, 1e-5 in float32, relative to the largest entry, TP 1 / 2 / SP), also
with the output layer fused into chunked log-probs (``ift/logprobs.py: linear_label_logprobs``)."""
import json

import pytest
from _infra.launch import torchrun


@pytest.fixture(scope="module")
def selection_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sel") / "sel.json"
    torchrun("output_selection.py", 2, str(out), timeout=300)
    return json.loads(out.read_text())


@pytest.mark.dist
def test_selected_logits_equal_full_logits_at_tp2_with_and_without_sp(selection_results):
    res = selection_results
    for name, r in res.items():
        if name.startswith("grad_"):
            continue
        assert r["embedding_equal"], name  # embedding_stage(embed_tokens(x)) == embedding(x)
        assert r["n"] == r["trained"] > 0, name
        assert r["shape"] == [r["n"], 64 // 2], name  # vocab 60 padded to 64, split over TP 2
        assert r["max_err"] <= 1e-6 * max(1.0, r["scale"]), (name, r)
        is_empty, dummy_shape, dummy_err = r["empty"]
        assert is_empty and dummy_shape == [1, 32] and dummy_err <= 1e-6, (name, r)
        assert r["scatter_ok"], (name, r)

GRAD_TOL = {"float64": (1e-12, 1e-10), "float32": (1e-6, 1e-5)}  # (loss, gradient)


@pytest.mark.dist
def test_selected_output_layer_gradients_equal_full_logits(selection_results):
    assert {"grad_tp1", "grad_tp2", "grad_tp2_sp"} <= set(selection_results)
    assert len(selection_results["grad_tp2_sp"]) == 12  # 2 dtypes x 3 losses x (selected, fused)
    for layout in ("grad_tp1", "grad_tp2", "grad_tp2_sp"):
        for name, r in selection_results[layout].items():
            loss_tol, grad_tol = GRAD_TOL[name.split("_")[0]]
            assert r["num_grads"] > 10, (layout, name)
            assert r["loss_err"] <= loss_tol * max(1.0, abs(r["loss_full"])), (layout, name, r)
            assert r["grad_rel_err"] <= grad_tol, (layout, name, r)
            if "all_prompt" in name:  # nothing trained: zero loss, zero gradients, no error
                assert r["loss_full"] == 0.0 and r["grad_max"] == 0.0, (layout, name, r)
            else:
                assert r["grad_max"] > 0.0, (layout, name, r)
