"""Shared pieces of the studies' drivers: study configs (where they are found, how ``quick:``
merges), the (lambda, gamma) points, and one ``megatron-ift train`` run as a subprocess."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import yaml

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The folder holding the ``megatron_ift`` package (the checkout, or site-packages): the
training subprocesses import this copy of the package."""
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
"""The study configs shipped with the package (``frozen_lake``, ``arithmetic``, ``smollm2``)."""
CURVE_KEYS = ("loss", "loss_sft", "loss_mixed_sft", "estimate_accuracy", "lambda")
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def resolve_config(name_or_path: str) -> str:
    """The study config a ``--configs`` entry names: an existing file (absolute, or relative to
    the current folder), else a config shipped with the package (``frozen_lake`` or
    ``frozen_lake.yaml``).

    Raises:
        FileNotFoundError: neither exists (one line listing the shipped names).
    """
    if os.path.isfile(name_or_path):
        return os.path.abspath(name_or_path)
    base = os.path.basename(name_or_path)
    packaged = os.path.join(CONFIG_DIR, base if base.endswith(".yaml") else base + ".yaml")
    if os.path.isfile(packaged):
        return packaged
    shipped = sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml"))
    raise FileNotFoundError(f"study config {name_or_path!r} is neither a file nor one of the "
                            f"shipped configs {shipped}")


@dataclass(frozen=True)
class Point:
    """One training setting: ``(max_lambda, gamma)``; SFT is (0, 0)."""

    lam: float
    gamma: float

    @property
    def method(self) -> str:
        if self.lam == 0.0 and self.gamma == 0.0:
            return "SFT"
        return "IFT"

    @property
    def key(self) -> str:
        return f"l{self.lam:g}_g{self.gamma:g}"


def deep_merge(base: dict, extra: Optional[dict]) -> dict:
    """``base`` updated recursively with ``extra`` (a new dict)."""
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_study(path: str, quick: bool) -> tuple[dict, dict]:
    """``(study section, run config)`` of a study file, with ``quick:`` merged in for --quick."""
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    quick_part = raw.pop("quick", None)
    if quick:
        raw = deep_merge(raw, quick_part)
    study = raw.pop("study")
    return study, raw


def points_and_seeds(study: dict) -> dict[Point, list[int]]:
    """Every (lambda, gamma) point of the study and the seeds it is trained with.

    The main comparison (SFT and the IFT default) uses ``seeds``; the sweep varies lambda at the
    default gamma and gamma at the default lambda, with ``sweep.seeds``.
    """
    ift = study.get("ift", {"max_lambda": 0.2, "gamma": 0.95})
    lam0, g0 = float(ift["max_lambda"]), float(ift["gamma"])
    out: dict[Point, list[int]] = {}

    def add(p: Point, seeds: Sequence[int]) -> None:
        out[p] = sorted(set(out.get(p, [])) | {int(s) for s in seeds})

    seeds = study.get("seeds", [1])
    add(Point(0.0, 0.0), seeds)
    add(Point(lam0, g0), seeds)
    sweep = study.get("sweep") or {}
    sweep_seeds = sweep.get("seeds", seeds)
    for lam in sweep.get("lambda", []):
        add(Point(float(lam), g0), sweep_seeds)
    for g in sweep.get("gamma", []):
        add(Point(lam0, float(g)), sweep_seeds)
    return out


def child_env(threads: int) -> dict[str, str]:
    """Environment of a training subprocess: a fresh world of one (no inherited rendezvous)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(PYTHONPATH=PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


def train_run(base_config: str, run_dir: str, point: Point, seed: int, threads: int,
              extra: Sequence[str] = ()) -> float:
    """Train one run to completion with ``megatron-ift train``; returns its wall time (s).

    A run directory that already holds a completed run is reused (``--reuse``).

    Raises:
        RuntimeError: the training process failed (its log is named).
    """
    from megatron_ift.checkpoint import layout

    if os.path.exists(os.path.join(run_dir, layout.COMPLETED)):
        return 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    cmd = [sys.executable, "-m", "megatron_ift.train", "--config", base_config,
           f"checkpoint.dir={run_dir}", f"ift.max_lambda={point.lam}", f"ift.gamma={point.gamma}",
           f"train.seed={seed}", f"data.seed={seed}", *extra]
    log = run_dir + ".log"
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.call(cmd, cwd=os.path.dirname(run_dir), env=child_env(threads), stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        with open(log, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"training failed (exit {rc}), log {log}:\n{tail}")
    return time.perf_counter() - start


def portable_paths(obj: Any, root: str) -> Any:
    """``obj`` with every string that is a path inside ``root`` made relative to it (for the
    published results: the checkout's location is not part of the result)."""
    if isinstance(obj, dict):
        return {k: portable_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable_paths(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(obj, root)
    return obj


def read_curve(run_dir: str, every: int = 5) -> list[dict]:
    """Per-step metrics of a run (every ``every``-th step and the last), for learning curves."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    keep = [r for i, r in enumerate(rows) if (i + 1) % every == 0 or i == 0 or i == len(rows) - 1]
    return [{"step": r["step"], **{k: r[k] for k in CURVE_KEYS if k in r}} for r in keep]


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min, max and count."""
    import statistics

    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}
