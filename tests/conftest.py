"""Test tiers (markers, see pyproject.toml): ``unit`` (in-process, seconds), ``dist`` (gloo
process groups or real training runs), ``slow`` (over ~30 s with its fixture), ``gpu`` (a CUDA
GPU). A test with none of the others is ``unit``; ``gpu`` tests are skipped without CUDA.

    pytest tests                 # everything (three xdist workers; what CI runs)
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
    weight: dict[str, int] = {}
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        file = item.nodeid.split("::")[0]
        w = 2 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("dist") else 0
        weight[file] = max(weight.get(file, 0), w)
    # Files with slow tests first, then the other multi-process ones, then the unit tests (stable
    # within each group). The xdist workers take whole files in this order (pyproject.toml:
    # --dist loadfile --no-loadscope-reorder), so the long files start early and the short ones
    # fill in at the end, instead of a long file starting last and running alone.
    first = {file: n for n, file in enumerate(weight)}
    items.sort(key=lambda it: (-weight[it.nodeid.split("::")[0]], first[it.nodeid.split("::")[0]]))
