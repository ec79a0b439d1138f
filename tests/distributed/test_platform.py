"""The platform decision (megatron_ift.platform) and what is decided from it: fusions, kernels,
host-sync discipline, and that no other module asks torch for CUDA or patches at import."""
import os
import pathlib
import subprocess
import sys

import pytest
from _infra import ROOT as INFRA_ROOT

ROOT = pathlib.Path(INFRA_ROOT)


@pytest.mark.dist
def test_importing_the_package_patches_nothing():
    """Every module of the package imported in a fresh interpreter: torch.cuda untouched, neither
    compatibility layer on, megatron-core's checkpoint writer not wrapped. Only bootstrap() does
    that, and then once."""
    code = r"""
import importlib, pkgutil, torch
real = (torch.cuda.current_device, torch.cuda.is_available, torch.compile)
import megatron_ift
for m in pkgutil.walk_packages(megatron_ift.__path__, "megatron_ift."):
    importlib.import_module(m.name)
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
from megatron_ift import cpu_compat, emulated_cuda
assert (torch.cuda.current_device, torch.cuda.is_available, torch.compile) == real
assert not cpu_compat.is_enabled() and not emulated_cuda.active()
assert not getattr(fa.FileSystemWriterAsync.write_preloaded_data, "dies_with_parent", False)
from megatron_ift.platform import bootstrap
p = bootstrap()
assert p.kind == "cpu" and cpu_compat.is_enabled() and bootstrap() is p
assert getattr(fa.FileSystemWriterAsync.write_preloaded_data, "dies_with_parent", False)
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    env.pop("MEGATRON_IFT_EMULATE_CUDA", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
