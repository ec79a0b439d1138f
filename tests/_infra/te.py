"""The Transformer Engine stand-in (``te_standin/``, its README) as the tests use it."""

from __future__ import annotations

import os

from _infra import ROOT, forkserver

STANDIN = os.path.join(ROOT, "tests", "_infra", "te_standin")
"""The folder to put on ``PYTHONPATH`` (or ``sys.path``) so that ``import transformer_engine``
finds the stand-in."""


def standin_env() -> dict[str, str]:
    """Environment overrides for a launch against the stand-in: the emulated CUDA device, and
    the stand-in in front of the suite's ``PYTHONPATH`` (such launches fork from a warm server of
    their own, :mod:`_infra.forkserver`)."""
    return {"PYTHONPATH": os.pathsep.join([STANDIN, forkserver.base_env()["PYTHONPATH"]]),
            "MEGATRON_IFT_EMULATE_CUDA": "1"}
