"""Helper processes die with the process that started them.

megatron-core's dist_checkpointing forks checkpoint-writer processes during a save and keeps a
``multiprocessing`` manager process for their results. If the trainer is killed (OOM killer,
``kill -9``, a scheduler's hard stop) such a child would outlive it, holding the trainer's stdout
open, so ``... | tee log`` and a Slurm step never end. :func:`die_with_parent`, called first
thing in each child, asks Linux to SIGKILL the child when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process: be SIGKILLed when the parent dies (Linux ``PR_SET_PDEATHSIG``).

    Exits at once if the parent is already gone (it died between the fork and this call).
    A no-op where ``prctl`` is unavailable (not Linux).
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


def start_manager(ctx):
    """A started ``multiprocessing`` manager (context ``ctx``) whose process dies with us."""
    manager = SyncManager(ctx=ctx)
    manager.start(initializer=die_with_parent)
    return manager
