"""Launch real training runs (the demo preset, shortened) from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import forkserver
from dist_utils import ROOT, torchrun

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
    full_env.update(env or {})
    entry = [script] if script else ["-m", "megatron_ift.train"]
    argv = [*entry, "--config", DEMO, f"checkpoint.dir={run_dir}",
            "parallel.tensor_model_parallel_size=1", *FAST, *overrides]
    log_path = f"{run_dir}.log"
    open(log_path, "w").close()
    proc = forkserver.popen(argv, env=full_env, log=log_path)
    proc.log_path = log_path
    return proc


def losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class WarmTrainer:
    """``megatron-ift train`` runs served by one warm process (``tests/workers/warm_train.py``).

    ``run(argv)`` returns a ``subprocess.CompletedProcess`` like ``subprocess.run`` of the real
    command would (exit status, what it printed on stdout and stderr). Use as a context manager;
    the process ends with the block.
    """

    def __init__(self, env: dict | None = None, timeout: float = 300) -> None:
        self.env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        self.env.pop("MEGATRON_IFT_DEBUG", None)
        self.env.update(env or {})
        self.timeout = timeout

    def __enter__(self) -> "WarmTrainer":
        import tempfile

        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "workers", "warm_train.py")],
            cwd=ROOT, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True)
        return self

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        import select

        self._proc.stdin.write(json.dumps({"argv": [str(a) for a in argv]}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self._proc.kill()
            self._log.seek(0)
            raise AssertionError(f"warm trainer gave no answer to {argv}:\n{self._log.read()[-4000:]}")
        reply = json.loads(line)
        return subprocess.CompletedProcess(argv, reply["returncode"], reply["stdout"], reply["stderr"])

    def __exit__(self, *exc) -> None:
        # every answered run has returned from main (saves joined, groups destroyed): nothing is
        # left to finish, and interpreter teardown of torch costs seconds, so the process is killed
        self._proc.kill()
        self._proc.wait(timeout=60)
        self._log.close()
