"""Preemption: SIGTERM / SIGUSR1 / SIGINT ask the run to save and stop at the next step boundary."""

from __future__ import annotations

import signal
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_ift.distributed import rank
from megatron_ift.platform import Platform

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    """Records SIGTERM / SIGUSR1 / SIGINT (installed by :meth:`install`); the trainer saves and
    stops at the next step boundary once every rank agrees (:meth:`agreed`).

    A second Ctrl-C (SIGINT) aborts at once (``KeyboardInterrupt``): the previous complete
    checkpoint stays the one ``latest`` names. Python drops an exception raised where it cannot
    propagate (a finalizer, logging's lock release), so the abort is also recorded and
    :meth:`check_abort` re-raises it before anything is saved.

    Args:
        platform: the flag of :meth:`agreed` lives on its device (NCCL takes no host tensors).
        on_signal: called with the signal number from the handler (the watchdog's deadline for
            the save and exit); must not block.
    """

    def __init__(self, platform: Platform, on_signal: Callable[[int], None] = lambda signum: None) -> None:
        self.platform = platform
        self.on_signal = on_signal
        self.signum: Optional[int] = None
        self.aborted = False

    def install(self) -> None:
        """Handle the preemption signals from now on."""
        for s in SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                self.aborted = True
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            if rank() == 0:
                print("interrupted: saving a checkpoint at the end of this step "
                      "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
        self.signum = signum
        self.on_signal(signum)

    def check_abort(self) -> None:
        """Raise ``KeyboardInterrupt`` if a second Ctrl-C came, even if its first raise was lost."""
        if self.aborted:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (ranks may get signals at different times).

        One host synchronisation, at the step boundary.
        """
        flag = torch.tensor(1 if self.signum is not None else 0, device=self.platform.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)
