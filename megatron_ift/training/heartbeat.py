"""Heartbeats between the ranks of a job: which rank went missing.

When a rank is paused or dies, the others notice only as a collective that never returns (or
returns an error): they cannot tell which peer is gone from inside it. Every rank therefore
publishes a counter, its host and its phase every few seconds in torch.distributed's key-value
store (the TCP store of the rendezvous, reached through a client connection of its own, so a
collective blocked on the default group never blocks it), and reads everyone else's.

The store is the channel because every rank reaches it wherever it runs (multi-node Slurm jobs
need no shared filesystem for it): torchrun's agent hosts it on node 0
(``TORCHELASTIC_USE_AGENT_STORE``), or global rank 0 does without torchrun. A peer is *missing*
when its counter has not moved for ``stale_s`` as measured by the reader's own clock (no clock
skew between hosts matters); when the store itself stops answering, its host is named instead
(rank 0's node, whose process or agent serves it).
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

PREFIX = "megatron_ift/heartbeat/"
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because a peer's process or connection is gone
    (a torch.distributed error, or gloo's closed-connection ``RuntimeError``)."""
    return isinstance(exc, dist.DistError) or any(text in str(exc) for text in _PEER_GONE)


class Heartbeat:
    """Publishes this rank's heartbeat and watches the others' (a daemon thread).

    Args:
        rank, world_size: this process in the job.
        phase: returns this rank's current phase, published with the heartbeat.
        interval_s: seconds between two heartbeats.
        stale_s: a peer whose counter has not moved for this long is reported missing.
        store: the key-value store (default: a client of the rendezvous store at
            ``MASTER_ADDR:MASTER_PORT``).
    """

    def __init__(self, rank: int, world_size: int, phase: Callable[[], str], *,
                 interval_s: float = 2.0, stale_s: float = 10.0,
                 store: Optional[dist.Store] = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.phase = phase
        self.interval_s, self.stale_s = interval_s, stale_s
        self.host = socket.gethostname()
        self._store = store
        self._count = 0
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (last value, when it last changed)
        self._store_error: Optional[tuple[str, float]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the thread (idempotent; nothing to do in a world of one)."""
        if self.world_size > 1 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="megatron-ift-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop beating and mark this rank as exited (a rank that ends is not a missing one)."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=2 * self.interval_s)
        if not self._thread.is_alive() and self._store is not None:
            try:
                self._store.set(f"{PREFIX}{self.rank}", f"exited|{self.host}|{self.phase()}")
            except Exception:  # noqa: BLE001  (the store may be gone with rank 0)
                pass

    def missing(self) -> str:
        """A sentence naming the peers that stopped reporting (or the unreachable store), or ""."""
        now = time.monotonic()
        if self._store_error is not None and now - self._store_error[1] > self.interval_s:
            return (f"the job's key-value store at {os.environ.get('MASTER_ADDR', '?')}:"
                    f"{os.environ.get('MASTER_PORT', '?')} (served from rank 0's node) stopped "
                    f"answering {now - self._store_error[1]:.0f} s ago ({self._store_error[0]})")
        gone = []
        for rank, (value, changed) in sorted(self._seen.items()):
            if rank != self.rank and now - changed > self.stale_s and not value.startswith("exited|"):
                _, host, phase = (value.split("|", 2) + ["", ""])[:3]
                gone.append(f"rank {rank} on {host} silent for {now - changed:.0f} s (last in {phase})")
        never = [r for r in range(self.world_size) if r != self.rank and r not in self._seen]
        if never and self._seen:
            gone.append(f"rank(s) {', '.join(map(str, never))} never reported")
        return "missing: " + "; ".join(gone) if gone else ""

    def wait_for_missing(self, wait_s: float) -> str:
        """:meth:`missing`, waiting up to ``wait_s`` for a peer that just died to go stale (a
        collective fails at once when a peer's connections close; its last heartbeat is fresh)."""
        deadline = time.monotonic() + wait_s
        while True:
            found = self.missing()
            if found or time.monotonic() >= deadline or self._thread is None:
                return found
            time.sleep(min(0.5, self.interval_s))

    def _connect(self) -> dist.Store:
        return dist.TCPStore(
            os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
            is_master=False, timeout=datetime.timedelta(seconds=max(self.interval_s * 2, 5.0)),
            wait_for_workers=False,
        )

    def _run(self) -> None:
        keys = [f"{PREFIX}{r}" for r in range(self.world_size)]
        while not self._stop.is_set():
            try:
                if self._store is None:
                    self._store = self._connect()
                self._count += 1
                self._store.set(keys[self.rank], f"{self._count}|{self.host}|{self.phase()}")
                present = [k for k in keys if self._store.check([k])]
                values = dict(zip(present, self._store.multi_get(present))) if present else {}
                now = time.monotonic()
                for r, k in enumerate(keys):
                    if k not in values:
                        continue
                    value = values[k].decode()
                    if self._seen.get(r, ("", 0.0))[0] != value:
                        self._seen[r] = (value, now)
                self._store_error = None
            except Exception as exc:  # noqa: BLE001  (a store that stopped answering is the news)
                if self._store_error is None:
                    self._store_error = (f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}", time.monotonic())
            self._stop.wait(self.interval_s)
