"""A progress watchdog per rank: a job that cannot make progress says so and ends.

The trainer reports progress (:meth:`Watchdog.phase`: the step's passes, evaluation, saves and
loads); a thread of its own, which makes no torch call, checks that the current phase has
reported within its timeout. When one has not (a collective waiting for a paused or lost peer, a
save stuck on a filesystem or a wedged writer process), or when a preemption signal's deadline
passes, it

1. writes every thread's Python stack to stderr (``faulthandler``, which needs no lock and no
   allocation), then the same dump with a header to ``<run dir>/hangs/rank<R>-<host>-<pid>.txt``
   from a helper thread it does not wait long for (the disk may be what is stuck);
2. prints one line naming the rank, the host, the phase and step, how long it waited, and which
   peers stopped sending heartbeats (:mod:`megatron_ift.training.heartbeat`);
3. ends the process with exit code 7 (:data:`megatron_ift.errors.EXIT_NO_PROGRESS`); the
   checkpoint writer processes die with it (``PR_SET_PDEATHSIG``,
   :mod:`megatron_ift.child_processes`). A save never moves ``latest`` before it is complete, so
   ``latest`` still names the previous complete checkpoint.

The Slurm scripts requeue a job that ended this way (a file in ``<run dir>/hangs`` newer than the
run's start), and the next run resumes from ``latest``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from megatron_ift.errors import EXIT_NO_PROGRESS

HANGS_DIR = "hangs"
"""Folder of the run directory that receives stack dumps (and tells Slurm to requeue)."""
STEP_FLOOR_S = 600.0
FIRST_STEP_S = 1800.0
SAVE_FLOOR_S = 900.0


@dataclass(frozen=True)
class Timeouts:
    """How long each kind of phase may go without progress (seconds; 0 = derived)."""

    step: float = 0.0
    """Training and evaluation phases (``train.hang_timeout_s``)."""
    save: float = 0.0
    """Checkpoint saves and loads (``checkpoint.save_timeout_s``)."""
    sigterm: float = 25.0
    """From SIGTERM to the end of the job (``checkpoint.sigterm_timeout_s``)."""


class Watchdog:
    """Watches one rank's progress; see the module docstring.

    Args:
        timeouts: the configured limits (0: derived from measured step and save times).
        rank: this process's global rank (for messages and the dump's name).
        run_dir: the run folder (stack dumps go to its ``hangs/`` folder).
        peers: returns a sentence about peers that stopped reporting, or "" (the heartbeat).
        poll_s: how often the thread checks.
        exit: how the process ends (tests pass their own; default ``os._exit``).
    """

    def __init__(self, timeouts: Timeouts, *, rank: int, run_dir: str,
                 peers: Callable[[], str] = lambda: "", poll_s: float = 0.5,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.timeouts = timeouts
        self.rank, self.run_dir = rank, run_dir
        self.host = socket.gethostname()
        self.peers = peers
        self.poll_s = poll_s
        self._exit = exit
        self._lock = threading.Lock()
        self._phase = "start-up"
        self._kind = "step"
        self._step = 0
        self._since = time.monotonic()
        self._deadline: Optional[tuple[float, str]] = None
        self._slowest_step = 0.0
        self._slowest_save = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- reporting progress (called by the trainer) ------------------------------------------

    def start(self) -> None:
        """Start watching (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="megatron-ift-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching (idempotent): the run is over or ends normally."""
        self._stop.set()

    @contextlib.contextmanager
    def phase(self, name: str, step: int, kind: str = "step") -> Iterator[None]:
        """Report entering (and leaving) a phase of step ``step``.

        Args:
            name: what runs, for the message (``estimation pass``, ``save``, ...).
            kind: ``step`` (training and evaluation) or ``save`` (checkpoint I/O): which
                timeout applies.
        """
        outer = (self._phase, self._kind)
        self._report(name, step, kind)
        start = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - start
            if kind == "save":
                self._slowest_save = max(self._slowest_save, took)
            self._report(*outer[:1], step, outer[1])

    def step_done(self, step: int, seconds: float) -> None:
        """Report a finished optimizer step and its duration (the derived timeout follows it)."""
        self._slowest_step = max(self._slowest_step, seconds)
        self._report("between steps", step, "step")

    def progress(self, part: str) -> None:
        """Progress: the current phase enters ``part`` (same step, same timeout)."""
        with self._lock:
            self._phase = part
            self._since = time.monotonic()

    def deadline(self, seconds: float, reason: str) -> None:
        """The job must be over within ``seconds`` from now (a preemption signal); safe to call
        from a signal handler."""
        self._deadline = (time.monotonic() + seconds, reason)

    def limit(self, kind: str) -> float:
        """The timeout in force for a phase of ``kind``."""
        if kind == "save":
            return self.timeouts.save or max(SAVE_FLOOR_S, 4.0 * self._slowest_save)
        if self.timeouts.step:
            return self.timeouts.step
        return max(STEP_FLOOR_S, 10.0 * self._slowest_step) if self._slowest_step else FIRST_STEP_S

    @property
    def where(self) -> str:
        """The current phase and step, for messages."""
        return f"phase {self._phase!r} of step {self._step}"

    def record(self, text: str) -> str:
        """Write ``text`` (with every thread's stack) to this rank's file in ``hangs/`` (what the
        Slurm scripts requeue on), waiting at most 5 s for the disk; returns the path, or a note
        that the folder did not take it."""
        path = os.path.join(self.run_dir, HANGS_DIR, f"rank{self.rank}-{self.host}-{os.getpid()}.txt")
        writer = threading.Thread(target=_write_dump, args=(path, text), daemon=True)
        writer.start()
        writer.join(timeout=5.0)  # a stuck disk must not keep the job alive
        return path if not writer.is_alive() and os.path.exists(path) else "stderr only (the run folder did not take it)"

    def _report(self, name: str, step: int, kind: str) -> None:
        with self._lock:
            self._phase, self._step, self._kind = name, step, kind
            self._since = time.monotonic()

    # -- the thread ---------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                waited = time.monotonic() - self._since
                limit = self.limit(self._kind)
            if waited > limit:
                self._fire(f"made no progress for {waited:.0f} s in {self.where} (limit {limit:.0f} s)")
                return
            if self._deadline is not None and time.monotonic() > self._deadline[0]:
                self._fire(f"could not finish after {self._deadline[1]} in time ({self.where})")
                return

    def _fire(self, what: str) -> None:
        header = f"rank {self.rank} on {self.host} (pid {os.getpid()}) {what}"
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001  (the stream may be what is broken)
            pass
        os.write(2, f"\n[megatron-ift watchdog] {header}; Python stacks of every thread:\n".encode())
        faulthandler.dump_traceback(file=2, all_threads=True)
        dump = self.record(header)
        try:
            peers = self.peers()
        except Exception as exc:  # noqa: BLE001
            peers = f"peers unknown ({type(exc).__name__})"
        line = (f"megatron-ift train: no progress: {header}{'; ' + peers if peers else ''}; "
                f"stacks in {dump}; exit code {EXIT_NO_PROGRESS} (a requeue resumes from the latest "
                "complete checkpoint)\n")
        os.write(2, line.encode())
        self._exit(EXIT_NO_PROGRESS)


def _write_dump(path: str, header: str) -> None:
    """The stack dump as a file (run in a thread the watchdog does not wait long for)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {header}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
    except OSError:
        pass
