"""IFTConfig: every option of the IFT method (docs/method.md), validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_ift.config_io import check_literals
from megatron_ift.validation import ConfigError, check_positive_int, check_range


@dataclass(frozen=True, kw_only=True)
class IFTConfig:
    """Options of Intuitive Fine-Tuning. Defaults are the reference recipe's.

    With ``max_lambda = 0`` (and ``min_lambda = 0``) and ``gamma = 0`` the step is plain SFT.
    """

    estimator: Literal["greedy", "kth", "sample", "top_p"] = "greedy"
    """How the model estimates each answer token: ``greedy`` (argmax, ties to the lowest id),
    ``kth`` (k-th most likely), ``sample`` (temperature sampling) or ``top_p`` (nucleus)."""
    k: int = 2
    """Rank used by the ``kth`` estimator (1 is greedy)."""
    temperature: float = 0.7
    """Softmax temperature of the ``sample`` and ``top_p`` estimators."""
    top_p: Optional[float] = None
    """Nucleus mass for the ``top_p`` estimator, in (0, 1]; required when estimator is top_p."""

    schedule: Literal["constant", "linear"] = "constant"
    """Lambda schedule: ``constant`` (max_lambda) or ``linear`` warm-up from min to max."""
    max_lambda: float = 0.2
    """Mixing coefficient of the estimated tokens (constant value, or end of the warm-up)."""
    min_lambda: float = 0.0
    """Start of the ``linear`` schedule."""
    warmup_steps: int = 0
    """Steps of the ``linear`` schedule from min_lambda to max_lambda (>= 1 when linear)."""
    disturb: Literal["none", "normal"] = "none"
    """``normal``: multiply lambda by (1 + disturb_std * eps_step), eps_step ~ N(0, 1) per step."""
    disturb_std: float = 0.5
    """Relative standard deviation of the lambda disturbance."""

    gamma: float = 0.95
    """Discount of the temporal residual connection, in [0, 1]; 0 gives uniform weights."""
    propagation_type: Literal["loss", "logps", "mask"] = "loss"
    """Per-token item propagated: ``loss`` (-logp / n), ``logps`` (-logp) or ``mask``."""
    propagation_norm: Literal["L1", "L2", "softmax", "log"] = "L1"
    """How the discounted sum becomes a weight: ``L1``, ``L2``, ``softmax`` or ``log``."""
    propagation_side: Literal["left", "right"] = "left"
    """``left``: weight by what follows a token; ``right``: by what precedes it (reference quirk)."""
    detach_weights: bool = False
    """Stop gradients through the propagation weights (the reference lets them flow)."""

    mixing_embeddings: Literal["live", "detached"] = "live"
    """``live``: the model's own embedding, gradients flowing; ``detached``: reference parity."""
    aggregation: Literal["sample_mean", "token_mean"] = "sample_mean"
    """Batch loss: mean of per-sample losses (reference) or ``token_mean`` (Megatron SFT)."""
    seed: int = 1234
    """Seed of the lambda disturbance and of the sampling estimators."""
    logprob_chunk_size: int = 1024
    """Trained positions per chunk of the optimisation pass's output layer + log-probs (fused,
    :func:`megatron_ift.ift.logprobs.linear_label_logprobs`): no rank holds more than this many
    rows of fp32 logits over its vocabulary shard, forward or backward. One chunk keeps its
    logits for backward; several recompute theirs (one more output-layer GEMM). A performance
    setting only: results do not depend on it."""

    def __post_init__(self) -> None:
        check_literals(self, "ift")
        check_positive_int("ift.k", self.k)
        check_range("ift.temperature", self.temperature, 0.0, low_inclusive=False)
        check_range("ift.max_lambda", self.max_lambda, 0.0, 1.0)
        check_range("ift.min_lambda", self.min_lambda, 0.0, 1.0)
        check_range("ift.disturb_std", self.disturb_std, 0.0)
        check_range("ift.gamma", self.gamma, 0.0, 1.0)
        check_positive_int("ift.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive_int("ift.logprob_chunk_size", self.logprob_chunk_size)
        if not isinstance(self.detach_weights, bool):
            raise ConfigError(f"ift.detach_weights={self.detach_weights!r} must be true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"ift.seed={self.seed!r} must be an integer")
        if self.estimator == "top_p":
            if self.top_p is None:
                raise ConfigError(
                    "ift.estimator='top_p' needs ift.top_p (the nucleus mass, e.g. 0.9)"
                )
            check_range("ift.top_p", self.top_p, 0.0, 1.0, low_inclusive=False)
        elif self.top_p is not None:
            raise ConfigError(
                f"ift.top_p={self.top_p!r} is only used by estimator='top_p' "
                f"(estimator is {self.estimator!r}); remove it or set ift.estimator=top_p"
            )
        if self.schedule == "linear" and self.warmup_steps < 1:
            raise ConfigError("ift.schedule='linear' needs ift.warmup_steps >= 1")
        if self.schedule == "linear" and self.min_lambda > self.max_lambda:
            raise ConfigError(
                f"ift.min_lambda={self.min_lambda} exceeds ift.max_lambda={self.max_lambda}"
            )

    @property
    def is_sft(self) -> bool:
        """True when the step reduces to plain SFT (no estimation pass needed)."""
        return self.max_lambda == 0.0 and self.min_lambda == 0.0 and self.gamma == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ConfigError if an option cannot work with a vocabulary of ``vocab_size``
        (the ``kth`` estimator's ``k``)."""
        if self.estimator == "kth" and self.k > vocab_size:
            raise ConfigError(f"ift.k={self.k} exceeds model.vocab_size={vocab_size}; the kth "
                              "estimator needs k <= vocabulary size")
