"""The fused, position-chunked output layer + vocab-parallel label log-probs
(``ift.logprobs.linear_label_logprobs``) equals the unfused path (output-layer GEMM, then
``log_softmax``): log-probs and the gradients of the hidden states and of the weight, for chunk
sizes 1 / 4 / n / > n, at TP 1, 2 and 4. Tolerances: 1e-12 in float64, 1e-5 in float32 (relative
to the largest entry)."""
import pytest
import torch
from _infra.launch import torchrun
from _infra.reference import LOGPROB_TOL, close_relative, output_layer_logprobs


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_fused_chunked_vocab_parallel_equals_single_rank(tmp_path, world):
    out = tmp_path / "lp.pt"
    torchrun("perf_logprobs_tp.py", world, str(out), timeout=120)
    saved = torch.load(out)
    ref = output_layer_logprobs(*saved["data"])
    assert len(saved["results"]) == 8
    for (dtype, chunk), got in saved["results"].items():
        for a, b in zip(got, ref):
            assert close_relative(a.double(), b, LOGPROB_TOL[dtype]), (dtype, chunk)
