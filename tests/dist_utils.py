"""Spawn multi-process gloo runs (torchrun) from tests, with a timeout and readable failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "workers")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str, nproc: int, *args: str, timeout: float = 240, env: dict | None = None) -> str:
    """Run ``tests/workers/<script>`` (or a path) under torchrun with ``nproc`` CPU processes.

    Returns the combined output; raises AssertionError with the output's tail on failure or
    timeout (a hung collective must fail the test, never hang CI).
    """
    path = script if os.path.isabs(script) else os.path.join(WORKERS, script)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        path, *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONWARNINGS"] = "ignore"
    full_env.update(env or {})
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"torchrun {script} x{nproc} timed out after {timeout}s\n{out[-4000:]}")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} x{nproc} failed ({proc.returncode}):\n{out[-6000:]}")
    return out
