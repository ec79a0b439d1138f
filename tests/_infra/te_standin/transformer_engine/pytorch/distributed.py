"""``transformer_engine.pytorch.distributed``: ``CudaRNGStatesTracker`` and ``checkpoint``."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.utils.checkpoint


class CudaRNGStatesTracker:
    """Named RNG states (TE's tracker, interchangeable with megatron-core's): ``add`` seeds a
    named state, ``fork`` runs a block on it and keeps its advance. The states are the default
    generator's (a CUDA device's in TE; this machine's CPU generator here)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"cuda rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def is_fp8_activation_recompute_enabled() -> bool:
    return False


@contextlib.contextmanager
def activation_recompute_forward(activation_recompute: bool = False, recompute_phase: bool = False):
    """TE's marker around a recomputed forward (it keeps FP8 scales fixed between the first and
    the recomputed forward); the stand-in's delayed scaling updates scales only at the end of
    the outermost autocast, so there is nothing to hold."""
    yield


def get_all_rng_states() -> dict:
    """The TE tracker's states (megatron-core asks for them with ``te_rng_tracker``)."""
    return dict(_TRACKER_STATES)


_TRACKER_STATES: dict = {}


def checkpoint(function: Callable, *args: Any, distribute_saved_activations: bool = False,
               get_rng_state_tracker: Optional[Callable] = None, tp_group=None,
               use_reentrant: bool = True, **kwargs: Any):
    """Activation recomputation: ``function(*args, **kwargs)`` rerun in the backward with the
    same RNG states (the default generator's and the tracker's, as TE restores them)."""
    if distribute_saved_activations:
        raise NotImplementedError("distribute_saved_activations is not covered by the stand-in")
    tracker = get_rng_state_tracker() if get_rng_state_tracker is not None else None
    tracker_states = tracker.get_states() if tracker is not None else None

    def run(*a):
        if tracker is not None:
            tracker.set_states({k: v.clone() for k, v in tracker_states.items()})
        return function(*a, **kwargs)

    # preserve_rng_state restores the default generator's state for the recomputation.
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
