"""Serve ``megatron-ift train`` invocations one after another in one warm process.

A test that needs several short world-of-one runs in a row (resume after damage, refused and
applied options) pays Python's, torch's and megatron-core's import once instead of per run. Each
request is one JSON line on stdin, ``{"argv": [...]}``; each answer one JSON line on stdout,
``{"returncode": int, "stdout": str, "stderr": str}``, with what ``megatron_ift.train.main``
printed while it ran. ``main`` tears down its process groups and megatron-core's parallel state
on every exit path, so the next request starts from the state a fresh process has after its
imports (``tests/test_hardening_train.py`` checks that a warm run's metrics equal a fresh run's).
"""

import contextlib
import io
import json
import os
import sys

from megatron_ift.train import main


def serve(requests, replies) -> None:
    for line in requests:
        argv = json.loads(line)["argv"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse refusals exit like the real command
                code = exc.code if isinstance(exc.code, int) else 1
        replies.write(json.dumps({"returncode": code, "stdout": out.getvalue(),
                                  "stderr": err.getvalue()}) + "\n")
        replies.flush()


if __name__ == "__main__":
    # the answers go to a private copy of the real stdout: a checkpoint writer forked during a run
    # inherits file descriptor 1, and must not write into the answer stream
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    serve(sys.stdin, replies)
