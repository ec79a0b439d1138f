"""The GPU path's pieces on CPU: the emulated CUDA device's own checks, the host-sync budget of a
step, the THD / dense-mask choice for packed rows, and hardware refusals (fusion selection:
tests/unit/test_platform.py)."""
from __future__ import annotations

import json

import pytest
from _infra import forkserver
from _infra.launch import WORKERS, free_port


def _worker(script: str, *args: str) -> dict:
    env = dict(forkserver.base_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PORT=str(free_port()))
    proc = forkserver.run([script, *args], cwd=WORKERS, env=env, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def emulation():
    return _worker("emulated_units.py")


def test_emulated_device_reports_cuda(emulation):
    assert emulation["cuda_available"] is True
    assert emulation["device_reported"] == "cuda:0"
    assert emulation["host_device_reported"] == "cpu"
    assert emulation["factory_like"] == emulation["to_device"] == "cuda:0"
    assert emulation["cuda_copy_is_new"] is True
    assert emulation["grad_on_device"] is True
    assert emulation["parameter_keeps_device"] is True
    assert emulation["module_cuda"] == "cuda:0"


def test_emulated_device_refuses_mixing_like_cuda(emulation):
    assert emulation["mixing"].startswith("raised: aten.add.Tensor mixes device tensors")
    assert emulation["module_host_mixing"].startswith("raised: aten.addmm")
    assert emulation["host_scalar"] == "cuda:0"  # 0-dim host tensors are scalars, as on CUDA


def test_emulated_device_refuses_host_tensors_on_nccl_groups(emulation):
    assert "NCCL" in emulation["collective_host_default_group"]
    assert "NCCL" in emulation["p2p_host_buffer"]
    assert emulation["collective_device_default_group"] == "ok"
    assert emulation["collective_host_gloo_group"] == "ok"  # an explicit gloo group takes host tensors
    assert emulation["object_collective"] == "ok"  # torch puts NCCL object collectives on the device


def test_emulated_device_counts_and_forbids_host_syncs(emulation):
    assert emulation["syncs_counted"] == 4  # float(), tolist(), cpu(), nonzero()
    assert emulation["cpu_is_host"] is True
    assert emulation["sync_in_region"].startswith("raised: host synchronisation")
    assert emulation["device_op_in_region"] == "cuda:0"


def test_step_host_syncs_do_not_grow_with_microbatches():
    """A sync inside either pass's micro-batch loop raises; what is left is per step: the one
    read of the metric sums and megatron-core's token count in finalize_model_grads."""
    out = _worker("emulated_sync_budget.py", "greedy", "kth", "top_p")
    for estimator, counts in out.items():
        assert counts["syncs"]["2"] == counts["syncs"]["4"] == [2, 2], estimator
        assert counts["eval"] == 1, estimator
