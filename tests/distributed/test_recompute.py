"""Activation recomputation with dropout reproduces the plain step exactly (TP 2, CPU)."""

import json

import pytest
from _infra.launch import torchrun


@pytest.mark.dist
def test_recompute_matches_plain_step_with_dropout(tmp_path):
    out = tmp_path / "r.json"
    torchrun("recompute.py", 2, str(out))
    r = json.loads(out.read_text())
    assert r["selective"] == r["base"] and r["selective_grads_equal"]
    assert r["full"] == r["base"] and r["full_grads_equal"]
    assert r["other_dropout_stream"] != r["base"]  # dropout is active in this test
