"""Storage faults of the run folder: what failed, named the way a user can act on it.

A checkpoint written by megatron-core's ``dist_checkpointing`` goes through writer processes and
torch's zip writer, whose errors reach the trainer as a ``CheckpointException`` whose text names
neither the file nor the cause (a full disk shows as ``unexpected pos 704 vs 598``). After a
failed save the folder is therefore probed directly (:func:`probe`): a real write of 1 MiB that
the operating system answers with the actual cause. Other writes of the run (``metrics.jsonl``,
the resolved config, tensorboard) raise ``OSError`` themselves (:func:`storage_oserror`).
"""

from __future__ import annotations

import errno
import os
from typing import Optional

CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for the process's file-size limit",
    errno.EACCES: "permission denied",
}
"""The errors that mean: the storage, not the program, is at fault."""
_PROBE_BYTES = 1 << 20


def probe(folder: str) -> Optional[str]:
    """Write and remove 1 MiB in ``folder``; returns the storage fault it meets, or None.

    Args:
        folder: where the failed write went (created if missing).

    Returns:
        e.g. ``"no space left on the device (ENOSPC)"``, or None when the folder takes the write.
    """
    path = os.path.join(folder, f".storage_probe_{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            block = b"\0" * 65536
            for _ in range(_PROBE_BYTES // len(block)):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in CAUSES:
            return f"{CAUSES[exc.errno]} ({errno.errorcode[exc.errno]})"
        return None
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    return None


def storage_oserror(exc: BaseException) -> Optional[OSError]:
    """The ``OSError`` with a storage errno in ``exc``'s chain (itself, causes, contexts), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in CAUSES:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe(err: OSError) -> str:
    """``"<path>: <cause> (ERRNO)"`` for a storage ``OSError``."""
    where = err.filename or "the run folder"
    return f"{where}: {CAUSES[err.errno]} ({errno.errorcode[err.errno]})"
