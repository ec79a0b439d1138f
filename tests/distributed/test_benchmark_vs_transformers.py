"""The project-vs-transformers benchmark script runs (tiny sizes, timing mode): both stacks hold
the same model (their first SFT losses on the same packed chat batch agree to float32 rounding)
and every reported figure is consistent with the raw step times."""

import json
import os
import statistics

import pytest
from _infra import forkserver
from _infra.launch import ROOT

MODES = ("mg_sft", "mg_ift", "hf_sft", "hf_ift")


def test_vs_transformers_timing_mode():
    env = {k: v for k, v in forkserver.base_env().items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    cmd = [os.path.join(ROOT, "benchmarks", "vs_transformers.py"), "--mode", "timing",
           "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "128",
           "--vocab", "512", "--seq", "64", "--mbs", "2", "--warmup", "1", "--steps", "2",
           "--threads", "1", "--data", "chat"]
    proc = forkserver.run(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first = out["first_loss_forward_only"]
    assert first["mg_sft"] == pytest.approx(first["hf_sft"], rel=1e-5)
    assert all(len(out["all_step_s"][m]) == 2 for m in MODES)
    med = out["median_step_s"]
    assert all(med[m] == statistics.median(out["all_step_s"][m]) > 0 for m in MODES)
    assert out["speedup_sft"] == med["hf_sft"] / med["mg_sft"]
    assert out["speedup_ift"] == med["hf_ift"] / med["mg_ift"]
    assert out["tokens_per_s"]["mg_sft"] == pytest.approx(2 * 64 / med["mg_sft"])
    assert 0.0 < out["answer_fraction"] < 1.0  # packed chat rows: prompts are not trained
