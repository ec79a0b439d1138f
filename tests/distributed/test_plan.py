"""The layout planner: buffer arithmetic, schedules, Llama-3 plans and the tools/plan.py CLI.

Byte-exactness against real megatron-core objects is tests/distributed/test_plan_memory.py; these tests are
in-process and take about a second.
"""
import json
import os
import re
import subprocess
import sys

from _infra import ROOT


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_json_for_70b():
    proc = _cli("--preset", "llama3-70b", "--nodes", "8", "--gpus-per-node", "8",
                "--seq-length", "4096", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    best = data["best"]
    assert data["world_size"] == 64 and best["fits"]
    assert best["memory_bytes"]["total"] <= best["memory_bytes"]["capacity"]
    lay = best["layout"]
    assert f"parallel.tensor_model_parallel_size={lay['tp']}" in best["overrides"]
    assert lay["tp"] * lay["pp"] * lay["dp"] == 64


def test_cli_reports_when_nothing_fits():
    proc = _cli("--preset", "llama3-70b", "--nodes", "1", "--gpus-per-node", "1")
    assert proc.returncode == 1
    assert "NO LAYOUT FITS" in proc.stdout
    assert re.search(r"total \(recompute full\)\s+\d+\.\d+ GiB", proc.stdout)
