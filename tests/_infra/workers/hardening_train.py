"""``megatron_ift.train.main`` with test-only fault hooks (production code has no switches).

Environment variables:

* ``HARDENING_KILL_AT_COMMIT=<step>``: rank 0 SIGKILLs itself in the commit of that step's save,
  after every rank's shards are on disk and before ``megatron_ift.json`` / ``latest`` are written.
* ``HARDENING_HOLD_WRITERS=<folder>``: each forked checkpoint-writer process, once it has written
  its shard, records its pid as a file in ``<folder>`` and sleeps, so that a test can kill the
  trainer while its writer children are alive (or pause them: a stuck save helper).
  ``HARDENING_HOLD_AFTER=<n>``: only the writers of saves after the first ``n`` complete ones.
"""

import os
import signal
import sys
import time

from megatron_ift.platform import bootstrap

bootstrap()

from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: E402

from megatron_ift.training import checkpointing  # noqa: E402
from megatron_ift.train import main  # noqa: E402

_kill_step = os.environ.get("HARDENING_KILL_AT_COMMIT")
if _kill_step:
    commit_checkpoint = checkpointing.commit_checkpoint

    def _dying_commit(root, ckpt_dir, step, metadata):
        if step == int(_kill_step):
            os.kill(os.getpid(), signal.SIGKILL)
        commit_checkpoint(root, ckpt_dir, step, metadata)

    checkpointing.commit_checkpoint = _dying_commit

_hold = os.environ.get("HARDENING_HOLD_WRITERS")
if _hold:
    _write = filesystem_async.FileSystemWriterAsync.write_preloaded_data  # ours: dies with parent
    _trainer = os.getpid()
    _commits = [0]  # complete saves so far; a forked writer sees the count of its fork
    _counted_commit = checkpointing.commit_checkpoint

    def _counting_commit(*args, **kwargs):
        _counted_commit(*args, **kwargs)
        _commits[0] += 1

    checkpointing.commit_checkpoint = _counting_commit

    def _held_write(*args, **kwargs):
        result = _write(*args, **kwargs)
        if os.getpid() != _trainer and _commits[0] >= int(os.environ.get("HARDENING_HOLD_AFTER", "0")):
            with open(os.path.join(_hold, str(os.getpid())), "w") as f:
                f.write(str(os.getppid()))
            time.sleep(120)
        return result

    filesystem_async.FileSystemWriterAsync.write_preloaded_data = staticmethod(_held_write)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
