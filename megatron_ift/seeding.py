"""Every random draw of a training step is keyed by ``(seed, step)``: a resumed run repeats the
uninterrupted one without saving any RNG state."""

from __future__ import annotations


def step_seed(seed: int, step: int) -> int:
    """The seed of optimizer step ``step`` (0-based) of a run seeded with ``seed``.

    Used for the step's torch / model-parallel RNG (dropout, initialisation of nothing: the
    model is built before step 0) and for IFT's lambda disturbance; a value every generator
    accepts (below 2**31 - 1).
    """
    return (int(seed) * 1_000_003 + int(step)) % (2**31 - 1)
