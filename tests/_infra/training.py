"""Launch real training runs (the demo preset, shortened) from tests."""

from __future__ import annotations

import json
import os
import time

from _infra import forkserver
from _infra.launch import ROOT, kill_group, torchrun

DEMO = os.path.join(ROOT, "configs", "demo.yaml")
FAST = [
    "train.eval_interval=0",
    "optimizer.lr_warmup_steps=2",
    "logging.log_interval=1",
]


def train(nproc: int, run_dir: str, *overrides: str, timeout: float = 300, env=None) -> str:
    """``megatron-ift train`` on the demo preset under torchrun; returns its output."""
    return torchrun("train_cli.py", nproc, "--config", DEMO, f"checkpoint.dir={run_dir}",
                    *FAST, *overrides, timeout=timeout, env=env)


def single_process(run_dir: str, *overrides: str, env=None, script: str | None = None):
    """A world-of-one run (no torchrun) as a child process (forked, see ``forkserver``), for
    signal tests.

    Output goes to ``<run_dir>.log`` (not a pipe: checkpoint writer processes orphaned by a
    SIGKILL would keep a pipe open). The path is ``proc.log_path``.
    """
    full_env = forkserver.base_env()
    full_env.pop("MEGATRON_IFT_DEBUG", None)
    full_env.update(env or {})
    entry = [script] if script else ["-m", "megatron_ift.train"]
    argv = [*entry, "--config", DEMO, f"checkpoint.dir={run_dir}",
            "parallel.tensor_model_parallel_size=1", *FAST, *overrides]
    log_path = f"{run_dir}.log"
    open(log_path, "w").close()  # a fresh log per run
    proc = forkserver.popen(argv, env=full_env, log=log_path)
    proc.log_path = log_path
    return proc


def read_log(proc) -> str:
    """What a ``single_process`` run has printed so far."""
    with open(proc.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def wait_for_output(proc, needle: str, timeout: float = 300) -> str:
    """Poll a ``single_process`` run's log until ``needle`` appears; returns the log. Raises
    AssertionError (with the log's tail) if the run exits first or ``timeout`` passes; the run's
    process group is killed then."""
    deadline = time.monotonic() + timeout
    while needle not in (out := read_log(proc)):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = (f"exited ({proc.returncode})" if proc.poll() is not None
                   else f"still running after {timeout}s")
            kill_group(proc)
            raise AssertionError(f"{needle!r} not seen, {why}:\n{out[-3000:]}")
        time.sleep(0.1)
    return out


def losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_train(argv: list[str], *, env: dict | None = None, timeout: float = 300):
    """``python -m megatron_ift.train <argv>`` in a world of one, to its end: a
    ``subprocess.CompletedProcess`` (exit status, stdout, stderr). The process is forked from
    the test fork server (``forkserver``), so a short run costs its own work, not the imports."""
    full_env = forkserver.base_env()
    full_env.pop("MEGATRON_IFT_DEBUG", None)
    full_env.update(env or {})
    return forkserver.run(["-m", "megatron_ift.train", *map(str, argv)], env=full_env,
                          timeout=timeout)
