"""On a real CUDA GPU (skipped without one, see conftest.py): the real trainer's GPU path.

The same check as part 2 of ``tools/gpu_check.py``: 2 IFT steps of the demo preset at TP 1 with
evaluation, a save after step 1 and a resume, under torch's CUDA sync-debug mode
(``MEGATRON_IFT_SYNC_DEBUG=1``: a host sync inside a micro-batch loop raises), and its losses
against the same run on the CPU from the same starting weights. On CPU machines the emulated
device covers these paths (tests/distributed/test_emulated_gpu.py, tests/distributed/test_gpu_path.py).
"""

import os
import sys

import pytest
from _infra.launch import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.dist]


def test_real_trainer_on_cuda_resumes_and_matches_cpu(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    out = gpu_check.placement(str(tmp_path), emulate=False)
    assert out.get("ok"), out
    assert out["resumed"] and out["max_relative_loss_difference"] < 1e-3, out
