"""The suite's pytest plugin: tiers and the order files run in.

Tiers (markers, declared in pyproject.toml), from the folder a test lives in:

* ``tests/unit``: ``unit``: in-process, seconds;
* ``tests/distributed``: ``dist``: gloo process groups, training or command-line runs in child processes;
* ``tests/gpu``: ``gpu``: a real CUDA GPU; skipped, with the reason, without one.

``slow`` (over ~30 s with its module fixture) is marked in the test files. ``pytest tests -m "not
slow"`` is the quick loop; ``pytest tests/unit -n 0`` the in-process tests in one process.
"""

from __future__ import annotations

import pathlib

import pytest

TIER_OF_FOLDER = {"unit": "unit", "distributed": "dist", "gpu": "gpu"}


def _tier(item) -> str:
    folder = pathlib.Path(str(item.fspath)).parent.name
    return TIER_OF_FOLDER.get(folder, "unit")


def pytest_collection_modifyitems(config, items):
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    weight: dict[str, int] = {}
    for item in items:
        tier = _tier(item)
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "gpu" and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        file = item.nodeid.split("::")[0]
        w = 2 if item.get_closest_marker("slow") else 1 if tier == "dist" else 0
        weight[file] = max(weight.get(file, 0), w)
    # Files with slow tests first, then the other multi-process ones, then the unit tests (stable
    # within each group). The xdist workers take whole files in this order (pyproject.toml:
    # --dist loadfile --no-loadscope-reorder), so the long files start early and the short ones
    # fill in at the end, instead of a long file starting last and running alone.
    first = {file: n for n, file in enumerate(weight)}
    items.sort(key=lambda it: (-weight[it.nodeid.split("::")[0]], first[it.nodeid.split("::")[0]]))
