"""Lambda schedule: a pure function of the step, identical on every rank and on resume."""

from __future__ import annotations

import torch

from megatron_ift.ift.config import IFTConfig
from megatron_ift.seeding import step_seed


def _step_normal(seed: int, step: int) -> float:
    """A standard-normal draw that depends only on (seed, step)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(step_seed(seed, step))
    return float(torch.randn((), generator=gen, dtype=torch.float64))


def lambda_at(cfg: IFTConfig, step: int) -> float:
    """Mixing coefficient for optimizer step ``step`` (0-based).

    ``constant``: max_lambda; ``linear``: min + (max - min) * min(1, step / warmup_steps).
    ``disturb='normal'`` multiplies by (1 + disturb_std * eps_step) with eps_step ~ N(0, 1) drawn
    from a generator seeded by (seed, step). The result is clamped to [0, 1].
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if cfg.schedule == "constant":
        lam = cfg.max_lambda
    else:
        frac = min(1.0, step / cfg.warmup_steps)
        lam = cfg.min_lambda + (cfg.max_lambda - cfg.min_lambda) * frac
    if cfg.disturb == "normal":
        lam = lam + _step_normal(cfg.seed, step) * cfg.disturb_std * lam
    return min(1.0, max(0.0, lam))
