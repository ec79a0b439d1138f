"""The fused, position-chunked output layer + vocab-parallel label log-probs
(``ift.logprobs.linear_label_logprobs``) equals the unfused path (output-layer GEMM, then
``log_softmax``): log-probs and the gradients of the hidden states and of the weight, for chunk
sizes 1 / 4 / n / > n, at TP 1, 2 and 4. Tolerances: 1e-12 in float64, 1e-5 in float32 (relative
to the largest entry)."""
import pytest
import torch
from _infra.reference import LOGPROB_TOL, close_relative, output_layer_logprobs
from _infra.workers.vocab_parallel import label_logprobs

from megatron_ift.ift.logprobs import linear_label_logprobs


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_chunked_equals_unfused_single_rank(chunk, dtype):
    g = torch.Generator().manual_seed(1)
    n, h, v = 16, 12, 40
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    ref = output_layer_logprobs(hidden, weight, labels, upstream)
    x = hidden.to(dtype).requires_grad_(True)
    w = weight.to(dtype).requires_grad_(True)
    lp = linear_label_logprobs(x, w, labels, chunk_size=chunk)
    assert lp.dtype == dtype
    (lp * upstream.to(dtype)).sum().backward()
    tol = LOGPROB_TOL[str(dtype)]
    for got, want in zip((lp.detach(), x.grad, w.grad), ref):
        assert close_relative(got.double(), want, tol)
    # ... and equals the project's unfused trainable path on the same logits
    unfused = label_logprobs((hidden @ weight.t()).to(dtype), labels)
    assert close_relative(lp.detach().double(), unfused.double(), tol)


def test_fused_without_weight_gradient_and_bad_shapes():
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(6, 4)  # frozen
    lp = linear_label_logprobs(hidden, weight, torch.tensor([0, 5, 2]), chunk_size=2)
    lp.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    with pytest.raises(ValueError, match="hidden \\[n, h\\]"):
        linear_label_logprobs(hidden, weight[:, :3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_label_logprobs(hidden, weight, torch.tensor([0, 1, 2]), chunk_size=0)


def test_chunk_size_key_is_validated():
    from megatron_ift.ift import IFTConfig
    from megatron_ift.validation import ConfigError

    assert IFTConfig().logprob_chunk_size == 1024
    with pytest.raises(ConfigError, match="ift.logprob_chunk_size=0"):
        IFTConfig(logprob_chunk_size=0)
