"""The project's error types and how every command-line entry point reports them.

Each error a user can cause is one of the classes below; its message is one line that names the
key, file or folder and the fix. Every CLI entry point runs through :func:`run_cli`, which prints
``<command>: <kind>: <message>`` on stderr (no traceback) and exits with the class's own code, so
scripts and schedulers can tell the failures apart. ``--debug`` or ``MEGATRON_IFT_DEBUG=1`` shows
the traceback as well. The catalogue of messages is ``docs/errors.md``.

Exit codes: 0 success, 1 an unexpected internal error (a traceback: a bug to report), 2
configuration, 3 data, 4 checkpoint, 5 conversion, 6 training stopped by the non-finite policy,
7 the job could not make progress (a hang, a rank gone, a save that cannot finish: requeue, the
next run resumes from ``latest``), 8 a storage fault while writing the run folder (disk full,
read-only, quota: fix the storage first; not requeued), 130 a second Ctrl-C.

The classes keep their historical import paths (``megatron_ift.validation.ConfigError``,
``megatron_ift.data.errors.DataError``, ``megatron_ift.checkpoint.layout.CheckpointError``,
``megatron_ift.convert.ConversionError``) and their historical bases (``ValueError`` /
``RuntimeError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

DEBUG_ENV = "MEGATRON_IFT_DEBUG"


class MegatronIFTError(Exception):
    """Base of every error a user can cause; ``exit_code`` is the process status it maps to."""

    exit_code = 1
    kind = "error"


class ConfigError(MegatronIFTError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""

    exit_code = 2
    kind = "configuration error"


class DataError(MegatronIFTError, ValueError):
    """Malformed or unusable input data; the message names the file and the line or row."""

    exit_code = 3
    kind = "data error"


class CheckpointError(MegatronIFTError, RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message says what to do."""

    exit_code = 4
    kind = "checkpoint error"


class ConversionError(MegatronIFTError, RuntimeError):
    """A conversion cannot proceed; the message names the problem and how to fix it."""

    exit_code = 5
    kind = "conversion error"


class TrainingDiverged(MegatronIFTError, FloatingPointError):
    """The non-finite-loss policy stopped the run (``train.nonfinite_policy``)."""

    exit_code = 6
    kind = "training stopped"


EXIT_NO_PROGRESS = 7
"""A rank made no progress (hang), lost a peer, or could not finish a save after SIGTERM."""


class RankLost(MegatronIFTError, RuntimeError):
    """Another rank of the job died or stopped answering; the message names it."""

    exit_code = EXIT_NO_PROGRESS
    kind = "rank lost"


class StorageError(MegatronIFTError, OSError):
    """Writing the run folder failed (no space, read-only, quota, file too large); the message
    names the path, the cause and what was kept."""

    exit_code = 8
    kind = "storage error"


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def debug_enabled(argv: list[str]) -> bool:
    """Whether tracebacks are wanted: ``--debug`` in ``argv`` or ``MEGATRON_IFT_DEBUG=1``."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(text: str) -> str:
    """``text`` on one line (newlines of wrapped library messages joined)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report(command: str, exc: BaseException, *, debug: bool) -> int:
    """Print ``exc`` for ``command`` on stderr; returns the exit code to use."""
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, MegatronIFTError):
        print(f"{command}: {exc.kind}: {one_line(exc)}", file=sys.stderr, flush=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        print(f"{command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    raise exc


def run_cli(command: str, main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``main(argv)`` (``--debug`` removed from ``argv``), mapping project errors to one line
    and an exit code; anything else propagates with its traceback (an internal error).

    Args:
        command: the name shown in messages, e.g. ``megatron-ift train``.
        main: the entry point's body; returns the exit status.
        argv: the command-line arguments.

    Returns:
        The process exit status.
    """
    debug = debug_enabled(argv)
    try:
        return int(main([a for a in argv if a != "--debug"]) or 0)
    except (MegatronIFTError, KeyboardInterrupt) as exc:
        return report(command, exc, debug=debug)
