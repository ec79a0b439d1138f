"""Hardening, in-process pieces: the error hierarchy and CLI reporting, the run lock, the resume
policy, YAML loading, NaN-safe estimators, damaged-checkpoint messages, the error catalogue."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from _infra import forkserver
from _infra.launch import ROOT

from megatron_ift import errors
from megatron_ift.errors import ConfigError
from megatron_ift.training import run_dir


def _run(*args, env=None, timeout=120):
    full_env = forkserver.base_env()
    full_env.pop(errors.DEBUG_ENV, None)
    full_env.update(env or {})
    return forkserver.run(list(args), env=full_env, timeout=timeout)


def test_plan_command_runs_and_refuses_a_yaml_list(tmp_path):
    r = _run("-m", "megatron_ift.cli", "plan", "--preset", "llama3-8b", "--nodes", "1")
    assert r.returncode == 0 and "recommended: TP" in r.stdout, r.stderr
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    for cmd in (["-m", "megatron_ift.cli", "plan"], [os.path.join("tools", "plan.py")]):
        r = _run(*cmd, "--config", str(bad))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip() == (f"megatron-ift plan: configuration error: config file {bad} "
                                    "must hold a mapping of sections")
    r = _run("-m", "megatron_ift.cli", "--debug", "plan", "--config", str(bad))
    assert r.returncode == 2 and "Traceback" in r.stderr


def _write_lock(root, **holder):
    os.makedirs(root, exist_ok=True)
    import json

    with open(os.path.join(root, run_dir.LOCK_NAME), "w") as f:
        json.dump(holder, f)


def test_run_lock_refuses_a_live_holder_and_takes_stale_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    root = str(tmp_path / "run")
    host = socket.gethostname()
    parent = os.getppid()  # alive, and not us
    _write_lock(root, host=host, pid=parent, start=run_dir.process_start_time(parent), since="then")
    lock = run_dir.RunLock(root)
    with pytest.raises(ConfigError, match=rf"checkpoint.dir={re.escape(root)} is in use by "
                       rf"another run \(pid {parent} on {re.escape(host)} since then.*"
                       "checkpoint.break_lock=true"):
        lock.acquire()
    # the same pid on another host: cannot be checked, so it is refused too
    _write_lock(root, host="elsewhere", pid=12345, start="1", since="then")
    with pytest.raises(ConfigError, match="in use by another run"):
        lock.acquire()
    lock.acquire(break_lock=True)  # ... unless the user breaks it
    assert lock.holder()["pid"] == os.getpid()
    lock.release()
    assert lock.holder() is None
    # stale: a dead pid here, a recycled pid (other start time), the same Slurm job
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for holder, env in [
        (dict(host=host, pid=dead.pid, start="1"), {}),
        (dict(host=host, pid=parent, start="not-its-start-time"), {}),
        (dict(host="elsewhere", pid=1, start="1", slurm_job_id="77"), {"SLURM_JOB_ID": "77"}),
    ]:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        _write_lock(root, since="then", **holder)
        lock.acquire()
        assert lock.held
        lock.release()
    assert os.listdir(root) == []  # no temporary files left


def test_error_catalogue_is_current():
    r = _run(os.path.join("tools", "error_catalogue.py"), "--check")
    assert r.returncode == 0, (r.stderr + " (a refusal was added or reworded: regenerate the "
                               "table with python tools/error_catalogue.py)")

_SPAWNED_MANAGER = '''
import time

if __name__ == "__main__":
    import megatron_ift  # noqa: F401  (before megatron-core: its expected warnings filtered)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_ift import mcore_compat

    mcore_compat.make_checkpoint_children_die_with_parent()  # what the GPU platform's bootstrap does

    queue = filesystem_async._get_write_results_queue()  # megatron-core's spawned manager (GPU path)
    print(queue._manager._process.pid, flush=True)
    time.sleep(120)
'''


def test_spawned_results_manager_dies_with_the_trainer(tmp_path):
    """Without cpu_compat (the GPU path) megatron-core spawns the results manager: it must not
    outlive a SIGKILLed trainer either."""
    script = tmp_path / "trainer.py"
    script.write_text(_SPAWNED_MANAGER)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        manager = int(proc.stdout.readline())
        os.kill(proc.pid, 9)
        proc.wait(timeout=30)

        def alive():
            try:
                with open(f"/proc/{manager}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.time() + 5
        while alive() and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(), "the results manager outlived the killed trainer"
    finally:
        proc.kill()
