"""The real trainer on the emulated CUDA device (megatron_ift.emulated_cuda): the GPU path's
placement and synchronisation rules checked on a CPU machine.

Every run starts from one shared checkpoint (a one-step CPU run). Under the emulation each layout
runs IFT steps with evaluation, a checkpoint save and (TP 2, PP 2 x VPP 2, DP 2 with the
distributed optimizer, CP 2) a resume; host tensors meeting the model, a device tensor or an NCCL-group
collective, or a host sync inside a micro-batch loop, fail it. Its metrics must equal the normal
CPU run's (one per method: losses do not depend on the layout) within 1e-5 relative: the GPU path
turns megatron-core's bias/activation fusions on, the CPU path runs them unfused.
"""

from __future__ import annotations

import os

import pytest
from _infra import forkserver
from _infra.launch import ROOT, torchrun
from _infra.training import losses, metrics, train

# over a minute with the module fixture (tests/_infra/plugin.py orders slow files first)
pytestmark = [pytest.mark.slow]

EMULATED = "train_cli_emulated.py"
STEPS = ["train.steps=2", "train.eval_interval=1", "train.eval_max_batches=1",
         "train.global_batch_size=8", "optimizer.lr_warmup_steps=0"]
SFT = ["ift.max_lambda=0", "ift.gamma=0"]

# layout -> (overrides, stop after step 1 and resume?)
LAYOUTS = {
    "tp2": (["parallel.tensor_model_parallel_size=2"], True),
    "pp2_vpp2": (["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
                  "parallel.virtual_pipeline_model_parallel_size=2"], True),
    "dp2_distopt": (["parallel.tensor_model_parallel_size=1",
                     "parallel.use_distributed_optimizer=true"], True),
    "tp2_sft": (["parallel.tensor_model_parallel_size=2", *SFT], False),
    # context parallelism: the rotary table's per-rank slice, the K/V all-gather, the
    # estimates' and log-probs' gathers on the device
    "cp2": (["parallel.tensor_model_parallel_size=1", "parallel.context_parallel_size=2"], True),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Shared starting weights (a one-step CPU run) and the normal CPU runs from them, IFT and
    SFT. Losses do not depend on the layout (tests/distributed/test_step_parallel.py), so one CPU run per
    method is the reference of every layout."""
    d = tmp_path_factory.mktemp("emulated")
    base = str(d / "base")
    train(2, base, "train.steps=1", "optimizer.lr_warmup_steps=0")
    start = [f"checkpoint.pretrained={base}", *STEPS, "parallel.tensor_model_parallel_size=2"]
    train(2, str(d / "cpu_ift"), *start)
    train(2, str(d / "cpu_sft"), *start, *SFT)
    return {"base": base, "ift": str(d / "cpu_ift"), "sft": str(d / "cpu_sft")}


def _emulated(run_dir: str, *overrides: str) -> str:
    demo = os.path.join(ROOT, "configs", "demo.yaml")
    return torchrun(EMULATED, 2, "--config", demo, f"checkpoint.dir={run_dir}",
                    "logging.log_interval=1", *overrides, timeout=300)


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_path_runs_and_matches_cpu(reference, tmp_path, layout):
    overrides, resume = LAYOUTS[layout]
    opts = [f"checkpoint.pretrained={reference['base']}", *STEPS, *overrides]
    emu = str(tmp_path / "emulated")
    if resume:
        first = _emulated(emu, *opts, "train.exit_after_steps=1")
        assert "eval step 1" in first and "saved checkpoint at step 1" in first, first[-2000:]
        last = _emulated(emu, *opts)
        assert "resumed from" in last, last[-2000:]
    else:
        last = _emulated(emu, *opts)
    assert "eval step 2" in last and "saved checkpoint at step 2" in last, last[-2000:]
    want = reference["sft" if "ift.max_lambda=0" in overrides else "ift"]
    assert len(losses(emu)) == 2
    for key in ("loss", "loss_sft", "loss_mixed_sft", "estimate_accuracy", "grad_norm"):
        got = [m[key] for m in metrics(emu)]
        assert got == pytest.approx([m[key] for m in metrics(want)], rel=1e-5, nan_ok=True), key


@pytest.mark.dist
def test_generation_on_the_gpu_path_matches_cpu(reference):
    """``megatron-ift generate`` (KV cache, greedy) under the emulated device: no placement
    violation, and the same tokens as on the CPU path."""

    def generate(emulate: bool) -> str:
        env = forkserver.base_env()
        env.pop("MEGATRON_IFT_EMULATE_CUDA", None)
        if emulate:
            env["MEGATRON_IFT_EMULATE_CUDA"] = "1"
        proc = forkserver.run(
            ["-m", "megatron_ift.cli", "generate", reference["base"], "--raw",
             "--prompt", "12+7=", "--prompt", "reverse: abc", "--max-new-tokens", "6",
             "--no-progress"], env=env, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout

    cpu = generate(False)
    assert "assistant:" in cpu
    assert generate(True) == cpu
