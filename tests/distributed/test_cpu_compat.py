"""The CPU compatibility layer (switched on by the platform bootstrap on a machine without CUDA)
in a fresh process: what it changes in megatron-core's start-up."""

import os
import subprocess
import sys

from _infra.launch import ROOT

SCRIPT = r"""
import sys
from megatron_ift import cpu_compat
from megatron_ift.platform import bootstrap
assert bootstrap().kind == "cpu" and cpu_compat.is_enabled()
from megatron.core import jit
from megatron.core.models.gpt import GPTModel
from megatron.core.fusions import fused_bias_swiglu
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
import torch
assert "torch._dynamo" not in sys.modules, "TorchDynamo was imported"
assert jit.jit_fuser is jit.noop_decorator
assert not hasattr(fused_bias_swiglu.bias_swiglu, "_torchdynamo_orig_callable")
q = fa._get_write_results_queue()
assert fa._get_write_results_queue() is q, "one queue per process"
assert torch.compile.__module__.startswith("torch"), "torch.compile itself is left alone"
assert torch.cuda.current_device() == torch.device("cpu")
print("ok")
"""


def test_enable_imports_megatron_without_dynamo_and_forks_the_results_manager():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
