"""Step metrics: device partial sums, one packed reduction, host metrics with the logged names."""

import math

import torch

from megatron_ift.training.step_metrics import StepMetrics, StepSums


def _t(x):
    return torch.tensor(float(x))


def test_sums_accumulate_and_reduce_to_metrics():
    sums = StepSums()
    sums += StepSums(loss_sum=_t(6), count=_t(3), mixed_sft_sum=_t(9), weight_max=_t(2),
                     num_samples=_t(3), weight_entropy_sum=_t(1.5), num_tokens=_t(12))
    sums += StepSums(loss_sum=_t(2), count=_t(1), mixed_sft_sum=_t(3), weight_max=_t(5),
                     num_samples=_t(1), weight_entropy_sum=_t(0.5), num_tokens=_t(4))
    sums += StepSums(sft_sum=_t(10), sft_count=_t(4), est_correct=_t(3), est_total=_t(12))
    m = sums.reduce((), torch.device("cpu"), lam=0.2)
    assert m.loss == 2.0 and m.loss_mixed_sft == 3.0 and m.loss_sft == 2.5
    assert m.weight_max == 5.0 and m.weight_entropy == 0.5 and m.estimate_accuracy == 0.25
    assert (m.num_samples, m.num_tokens, m.count, m.loss_sum) == (4.0, 16.0, 4.0, 8.0)
    assert sums.loss_sum.dtype == torch.float64


def test_empty_step_gives_finite_losses_and_nan_accuracy():
    m = StepSums().reduce((), torch.device("cpu"), lam=0.0)
    assert m.loss == 0.0 and m.loss_sft == 0.0 and math.isnan(m.estimate_accuracy)


def test_logged_names():
    m = StepSums(loss_sum=_t(1), count=_t(1)).reduce((), torch.device("cpu"), lam=0.3)
    d = m.as_dict()
    assert d["lambda"] == 0.3 and "lam" not in d
    assert set(d) == {"loss", "loss_sft", "loss_mixed_sft", "lambda", "estimate_accuracy",
                      "weight_max", "weight_entropy", "num_samples", "num_tokens", "loss_sum",
                      "count", "sft_sum", "sft_count"}
    assert isinstance(m, StepMetrics)
