"""The IFT-vs-SFT benchmark script runs (tiny sizes) and reports consistent timings."""

import json
import os

from _infra import forkserver
from _infra.launch import ROOT


def test_benchmark_timing_mode_reports_ratio_and_floor():
    env = {k: v for k, v in forkserver.base_env().items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    cmd = [os.path.join(ROOT, "benchmarks", "ift_vs_sft.py"), "--mode", "timing",
           "--layers", "2", "--hidden", "32", "--heads", "4", "--vocab", "256", "--seq", "32",
           "--mbs", "2", "--microbatches", "2", "--warmup", "1", "--steps", "2", "--prompt-fraction", "0.5"]
    proc = forkserver.run(cmd, env=env, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    med = out["median_step_s"]
    assert set(med) == {"ift", "sft", "forward"} and all(v > 0 for v in med.values())
    assert all(len(v) == 2 for v in out["all_step_s"].values())
    assert out["ratio"] == med["ift"] / med["sft"]
    assert out["floor"] == 1.0 + med["forward"] / med["sft"]
