"""Spawn multi-process gloo runs from tests (the worker scripts of ``tests/_infra/workers``), with a
timeout and readable failures."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import tempfile
import time

from _infra import forkserver
from _infra.forkserver import ROOT, kill_group  # noqa: F401  (re-exported: the tests import them here)

WORKERS = os.path.join(ROOT, "tests", "_infra", "workers")


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range (32768-60999 by default).

    A port the kernel hands out (bind to 0) can be handed out again, as the ephemeral end of any
    other test's gloo connection, before the rendezvous binds it: CI saw that as EADDRINUSE.
    Ports below 32768 are never handed out implicitly; each pytest-xdist worker draws from its
    own block, so two workers never pick the same one.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    block = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + (block % 6) * 2000
    while True:
        port = random.randrange(low, low + 2000)
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        return port


class World:
    """The ranks of one gloo world running in the background (:func:`start_world`), for tests
    that watch, signal or kill single ranks. Each rank is its own session (``kill_group``)."""

    def __init__(self, procs: list, logs: list[str]) -> None:
        self.procs, self.logs = procs, logs

    def output(self, rank: int) -> str:
        """What rank ``rank`` has printed so far (stdout and stderr)."""
        with open(self.logs[rank], encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for(self, needle: str, rank: int = 0, timeout: float = 300) -> str:
        """Poll rank ``rank``'s output until ``needle`` appears; AssertionError if the rank ends
        first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while needle not in (out := self.output(rank)):
            if self.procs[rank].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not seen on rank {rank}:\n{out[-3000:]}")
            time.sleep(0.05)
        return out

    def wait(self, timeout: float) -> str:
        """Wait for every rank like torchrun (a failed rank stops the others); "" or why the
        world failed."""
        return _wait_all(self.procs, timeout)

    def kill(self) -> None:
        """SIGKILL every rank still alive, with its children."""
        for proc in self.procs:
            if proc.poll() is None:
                kill_group(proc)
                proc.wait()


def start_world(script: str, nproc: int, *args: str, logs: str, env: dict | None = None) -> World:
    """Start ``tests/_infra/workers/<script>`` (or a path) as the ``nproc`` CPU ranks of one gloo
    world, forked from the fork server with the environment torchrun gives its workers
    (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); each rank's output goes to ``<logs>/rank<r>.log``."""
    path = script if os.path.isabs(script) else os.path.join(WORKERS, script)
    full_env = forkserver.base_env()
    full_env.update(env or {})
    port = str(free_port())
    procs, paths = [], []
    for rank in range(nproc):
        rank_env = dict(full_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        paths.append(os.path.join(logs, f"rank{rank}.log"))
        procs.append(forkserver.popen([path, *map(str, args)], env=rank_env, log=paths[-1]))
    return World(procs, paths)


def torchrun(script: str, nproc: int, *args: str, timeout: float = 240, env: dict | None = None) -> str:
    """Run ``tests/_infra/workers/<script>`` (or a path) as the ``nproc`` CPU ranks of one gloo
    world (:func:`start_world`) and wait for them; like torchrun, a failed rank stops the others.
    torchrun's elastic agent, whose own torch import and monitoring cost seconds per launch, is
    not under test here: ``tests/distributed/test_launch.py`` runs the launch scripts (which exec
    the real torchrun) and ``tests/distributed/test_slurm.py`` the real trainer under torchrun in
    Slurm.

    Returns the ranks' combined output (rank 0 first); raises AssertionError with the output's
    tail on failure or timeout (a hung collective must fail the test, never hang CI).
    """
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        world = start_world(script, nproc, *args, logs=logs, env=env)
        failure = world.wait(timeout)
        world.kill()  # a failed or hung world: stop every rank and its children
        out = "".join(world.output(rank) for rank in range(nproc))
    if failure:
        raise AssertionError(f"{script} x{nproc} {failure}:\n{out[-6000:]}")
    return out


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> str:
    """Wait for every rank; returns "" or why the world failed (a rank's exit status, timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            return "failed (" + ", ".join(f"rank {r} exit {c}" for r, c in bad) + ")"
        if all(c == 0 for c in codes):
            return ""
        if time.monotonic() > deadline:
            return f"timed out after {timeout}s"
        time.sleep(0.05)
