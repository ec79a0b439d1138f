"""Estimators and log-probs split over 2 and 4 gloo ranks equal the single-rank results."""

import pytest
import torch
from _infra.launch import torchrun

# the module fixture launches three worlds (1, 2 and 4 processes): about a minute on an idle
# 2-core machine, several when it is shared
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIGS = {
    "greedy": dict(estimator="greedy"),
    "kth2": dict(estimator="kth", k=2),
    "kth3": dict(estimator="kth", k=3),
    "sample": dict(estimator="sample", temperature=0.7),
    "top_p": dict(estimator="top_p", top_p=0.8, temperature=1.0),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    g = torch.Generator().manual_seed(0)
    b, s, padded, vocab = 3, 10, 64, 53  # 11 padded columns, spread over the last shards
    logits = torch.round(torch.randn(b, s, padded, generator=g) * 2) / 2  # many exact ties
    logits[..., vocab:] = 50.0  # padding would win if it were ever considered
    logits[0, 0, :vocab] = 1.0  # a row that is one big tie
    payload = {
        "logits": logits,
        "labels": torch.randint(0, vocab, (b, s), generator=g),
        "vocab_size": vocab,
        "configs": CONFIGS,
        "grad_weights": torch.randn(b, s, generator=g, dtype=torch.float64),
    }
    path = d / "full.pt"
    torch.save(payload, path)
    results = {}
    for world in (1, 2, 4):
        out = d / f"out{world}.pt"
        torchrun("estimators_tp.py", world, str(path), str(out), timeout=180)
        results[world] = torch.load(out)
    return payload, results


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_estimates_identical_across_tp(data, world, name):
    payload, results = data
    ids1, ids = results[1][name], results[world][name]
    assert torch.equal(ids, ids1)
    assert int(ids.max()) < payload["vocab_size"]


@pytest.mark.dist
def test_greedy_ties_go_to_lowest_id(data):
    _, results = data
    assert int(results[2]["greedy"][0, 0]) == 0


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_logprobs_and_grads_match_tp1(data, world):
    payload, results = data
    ref = torch.log_softmax(payload["logits"].double(), -1).gather(-1, payload["labels"][..., None])[..., 0]
    torch.testing.assert_close(results[1]["logprobs"], ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(results[world]["logprobs"], results[1]["logprobs"], rtol=0, atol=1e-6)
    for w in (1, world):  # the metrics-only path agrees with the trainable one
        torch.testing.assert_close(results[w]["logprobs_no_grad"], ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(results[world]["logprob_grad"], results[1]["logprob_grad"], rtol=0, atol=1e-6)
