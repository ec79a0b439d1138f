"""Test tiers (markers, see pyproject.toml): ``unit`` (in-process, seconds), ``dist`` (gloo
process groups or real training runs), ``slow`` (over ~30 s with its fixture), ``gpu`` (a CUDA
GPU). A test with none of the others is ``unit``; ``gpu`` tests are skipped without CUDA.

    pytest tests                 # everything (two xdist workers; what CI runs)
    pytest tests -m "not slow"   # the quick loop
    pytest tests -m unit -n 0    # in-process tests only, one process
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TIERS = ("dist", "slow", "gpu")


def pytest_collection_modifyitems(config, items):
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)
