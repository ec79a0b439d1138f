"""The IFT method as pure functions over local shards (see docs/method.md)."""

from megatron_ift.ift.config import IFTConfig
from megatron_ift.ift.estimators import estimate
from megatron_ift.ift.logprobs import check_labels, label_logprobs_no_grad, linear_label_logprobs
from megatron_ift.ift.loss import LossTerms, aggregate, ift_loss_terms
from megatron_ift.ift.mixing import estimated_sequence, mix_embeddings
from megatron_ift.ift.schedule import lambda_at
from megatron_ift.ift.weights import Groups, propagation_weights

__all__ = [
    "IFTConfig",
    "Groups",
    "LossTerms",
    "aggregate",
    "check_labels",
    "estimate",
    "estimated_sequence",
    "ift_loss_terms",
    "label_logprobs_no_grad",
    "linear_label_logprobs",
    "lambda_at",
    "mix_embeddings",
    "propagation_weights",
]
