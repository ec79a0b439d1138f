"""A fork server for the suite's short-lived Python processes (ranks of a gloo world, CLI runs).

A fresh interpreter spends about 6 s of CPU importing torch, TorchDynamo and megatron-core before
it does anything; the suite starts well over a hundred of them on a 2-core CI machine. One server
per pytest process imports them once and forks each launch instead. Each child then behaves as
``python script args`` (or ``python -m module args``) would: its own session (``kill_group``
works), its own environment, working directory, ``sys.argv``, ``sys.path[0]`` and output file,
``__main__`` semantics, atexit handlers, and an exit status (negative for a signal, as
``subprocess`` reports it).

What the server imports is what every CPU process of this project imports the same way whether it
later enables ``cpu_compat`` or the emulated CUDA device: torch, TorchDynamo, transformers and
datasets (imports that are lazy and device-independent), and megatron-core through
``cpu_compat.import_megatron_with_eager_fusions`` (the one import both modes make before
patching anything). Nothing is patched and no tensor op runs in the server, so a forked child
starts from the state a fresh one reaches after those imports. The server is single-threaded
(forking a threaded process can inherit a held lock); it checks that and refuses to serve
otherwise.

A launch whose environment differs from the server's in a variable that takes effect at
interpreter or library start (``STARTUP_ENV``: thread counts, ``PYTHON*``, ``LD_*``, CUDA
visibility, the Hugging Face libraries' cache and offline settings) cannot be forked
faithfully; :func:`popen` starts those as ordinary processes.
``MEGATRON_IFT_NO_FORKSERVER=1`` turns the server off for a run of the suite.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")  # on PYTHONPATH: workers import the oracle as _infra.reference
DISABLE_ENV = "MEGATRON_IFT_NO_FORKSERVER"
STARTUP_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
               "MALLOC_ARENA_MAX")
STARTUP_PREFIXES = ("PYTHON", "LD_", "GOMP_", "KMP_", "HF_", "TRANSFORMERS_", "DATASETS_")
#: The server's own additions: pyarrow's jemalloc (imported with ``datasets``) otherwise starts a
#: background purging thread, and a threaded process must not fork. Purging then happens inline:
#: the same allocations, no thread.
SERVER_ENV = {"JE_ARROW_MALLOC_CONF": "background_thread:false"}


def base_env() -> dict[str, str]:
    """The environment tests give Python subprocesses (and the server starts with)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _startup_keys(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in STARTUP_ENV or k.startswith(STARTUP_PREFIXES)}


def kill_group(proc) -> None:
    """SIGKILL a process started in its own session (``popen`` does that) and everything in its
    group (a training run and any checkpoint writer it left); nothing if it is already gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Child:
    """A forked launch, with the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, server: "_Server", pid: int) -> None:
        self._server = server
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self._server.exit_status(self.pid)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


class _Server:
    """The client side: one server process, requests by line on its stdin; a reader thread takes
    its replies from its stdout (a pid per request, an exit status per child as it ends)."""

    def __init__(self, path_prefix: str = "") -> None:
        self.env = base_env()
        self.env["PYTHONPATH"] = path_prefix + self.env["PYTHONPATH"]
        self.startup = _startup_keys(self.env)  # what a forked launch must share with the server
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)], cwd=ROOT, env={**self.env, **SERVER_ENV},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"fork server did not start: {ready!r}")
        self._lock = threading.Lock()  # one request at a time
        self._pids: "queue.Queue[dict]" = queue.Queue()
        self._status: dict[int, int] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "exited" in msg:
                self._status[msg["exited"]] = msg["status"]
            else:
                self._pids.put(msg)
        self._pids.put({"error": "the fork server exited"})

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> int:
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd, "stdout": stdout,
                              "stderr": stderr})
        with self._lock:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
            msg = self._pids.get(timeout=60)
        if "error" in msg:
            raise RuntimeError(f"fork server: {msg['error']}")
        return msg["pid"]

    def exit_status(self, pid: int) -> Optional[int]:
        return self._status.get(pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


#: Warm servers of this pytest process, by the ``PYTHONPATH`` entries their launches put in front
#: of :func:`base_env`'s ("" for the plain one): e.g. the Transformer Engine stand-in's folder,
#: which must be importable before megatron-core is. At most MAX_SERVERS; beyond, fresh interpreters.
_SERVERS: dict[str, _Server] = {}
_UNAVAILABLE: dict[str, str] = {}
MAX_SERVERS = 2


def _path_prefix(env: dict[str, str]) -> Optional[str]:
    """"" when ``env`` starts Python as :func:`base_env` does; the entries it puts in front of
    ``base_env``'s ``PYTHONPATH`` when that is its only start-up difference; None otherwise (a
    launch that must start fresh: other thread counts, another path, ...)."""
    default, own = _startup_keys(base_env()), _startup_keys(env)
    base_path, path = default.pop("PYTHONPATH", ""), own.pop("PYTHONPATH", "")
    if own != default or not path.endswith(base_path):
        return None
    return path[: len(path) - len(base_path)]


def _server(path_prefix: str = "") -> Optional[_Server]:
    """The server of this pytest process for ``path_prefix`` (started on first use), or None if
    it could not start or MAX_SERVERS run already: then the launch is a fresh interpreter
    (slower, same results; a warning says why a server failed)."""
    if path_prefix in _SERVERS:
        return _SERVERS[path_prefix]
    if path_prefix in _UNAVAILABLE or len(_SERVERS) >= MAX_SERVERS:
        return None
    try:
        server = _Server(path_prefix)
    except (RuntimeError, OSError, ValueError) as exc:
        _UNAVAILABLE[path_prefix] = str(exc)
        warnings.warn(f"fork server unavailable, starting fresh interpreters: {exc}")
        return None
    atexit.register(server.close)
    _SERVERS[path_prefix] = server
    return server


def popen(argv: list[str], *, env: dict[str, str], log: str, cwd: str = ROOT,
          stderr_log: Optional[str] = None):
    """Start ``python <argv>`` in a new session, its stdout appended to the file ``log`` (and
    its stderr too, or to ``stderr_log``); forked from the server when its environment allows,
    else a ``subprocess.Popen``.

    Args:
        argv: the interpreter's arguments: ``[script, *args]`` or ``["-m", module, *args]``.
        env: the child's complete environment.
        log: the output file.
        cwd: the working directory.
        stderr_log: a separate file for stderr.
    """
    argv = [str(a) for a in argv]
    for path in (log, stderr_log):
        if path:
            open(path, "a").close()  # exists on return, before the child writes
    prefix = _path_prefix(env) if os.environ.get(DISABLE_ENV) != "1" else None
    server = _server(prefix) if prefix is not None else None
    if server is not None and _startup_keys(env) == server.startup:
        return Child(server, server.spawn(argv, env, cwd, log, stderr_log or log))
    out = open(log, "a")
    err = open(stderr_log, "a") if stderr_log else None
    try:
        return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=out,
                                stderr=err or subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()
        if err:
            err.close()


def run(argv: list[str], *, env: Optional[dict[str, str]] = None, cwd: str = ROOT,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, *argv], capture_output=True, text=True)`` through :func:`popen`.

    Args:
        argv: the interpreter's arguments.
        env: the child's environment (default :func:`base_env`).
        cwd: the working directory.
        timeout: seconds; past it the child's session is killed and ``TimeoutExpired`` raised.
    """
    with tempfile.TemporaryDirectory(prefix="run-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = popen(argv, env=env or base_env(), log=out, cwd=cwd, stderr_log=err)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait()
            raise
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess([sys.executable, *argv], code, f_out.read(),
                                               f_err.read())


# -- the server process ------------------------------------------------------------------------


def _preload() -> None:
    import datasets  # noqa: F401  (SFT data files: with transformers 2.4 s of every training run)
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use)
    import transformers  # noqa: F401  (tokenizers)

    from megatron_ift import cpu_compat

    cpu_compat.import_megatron_with_eager_fusions()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _run_child(request: dict) -> None:
    """In the forked child: become ``python <argv>`` and exit with its status."""
    import runpy
    import traceback

    os.setsid()
    for fd_number, key in ((1, "stdout"), (2, "stderr")):
        fd = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, fd_number)
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    argv = request["argv"]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = request["cwd"]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code & 0xFF)


def _serve() -> None:
    _preload()
    if _threads() != 1:
        print(json.dumps({"error": f"server has {_threads()} threads after imports"}), flush=True)
        return
    reply = sys.stdout
    print("ready", flush=True)
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.05)
        if ready:
            line = sys.stdin.readline()
            if not line:
                return
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(request)
            children.add(pid)
            reply.write(json.dumps({"pid": pid}) + "\n")
            reply.flush()
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                reply.write(json.dumps({"exited": pid,
                                        "status": os.waitstatus_to_exitcode(status)}) + "\n")
                reply.flush()


if __name__ == "__main__":
    _serve()
