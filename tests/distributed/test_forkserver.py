"""The test fork server (tests/_infra/forkserver.py) behaves as a fresh ``python`` would: argv, cwd,
environment, ``__main__``, exit status (also by signal), separate stdout and stderr, its own
session; launches it cannot fork faithfully (start-up environment) are fresh processes."""

import json
import os
import signal
import subprocess
import time

import pytest
from _infra import forkserver

PROBE = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("PROBE_VALUE"),
                  "name": __name__, "path0": sys.path[0], "session": os.getsid(0) == os.getpid(),
                  "threads": __import__("torch").get_num_threads()}))
print("to stderr", file=sys.stderr)
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


def test_a_forked_child_is_what_python_script_would_be(probe, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = dict(forkserver.base_env(), PROBE_VALUE="x", PROBE_EXIT="3")
    r = forkserver.run([str(probe), "a", "--b"], env=env, cwd=str(cwd))
    assert r.returncode == 3, r.stderr
    seen = json.loads(r.stdout)
    assert seen == {"argv": [str(probe), "a", "--b"], "cwd": str(cwd), "env": "x",
                    "name": "__main__", "path0": str(tmp_path), "session": True, "threads": 1}
    assert r.stderr == "to stderr\n"


def test_modules_exceptions_and_signals(tmp_path):
    r = forkserver.run(["-m", "megatron_ift.cli", "--help"])
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("raise ValueError('boom')\n")
    r = forkserver.run([str(bad)])
    assert r.returncode == 1 and "ValueError: boom" in r.stderr and "Traceback" in r.stderr
    sleeper = tmp_path / "sleep.py"
    sleeper.write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    log = tmp_path / "sleep.log"
    proc = forkserver.popen([str(sleeper)], env=forkserver.base_env(), log=str(log))
    assert isinstance(proc, forkserver.Child)
    deadline = time.monotonic() + 30
    while "up" not in log.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([str(sleeper)], timeout=1)


def test_a_start_up_environment_gets_a_fresh_interpreter(probe, tmp_path):
    env = dict(forkserver.base_env(), OMP_NUM_THREADS="2")
    proc = forkserver.popen([str(probe)], env=env, log=str(tmp_path / "out.log"))
    assert isinstance(proc, subprocess.Popen)
    assert proc.wait(timeout=120) == 0
    seen = json.loads((tmp_path / "out.log").read_text().splitlines()[0])
    assert seen["threads"] == 2 and seen["name"] == "__main__"


def test_entries_put_in_front_of_the_path_get_a_warm_server_of_their_own(tmp_path, monkeypatch):
    """A launch whose only start-up difference is PYTHONPATH entries in front of the default ones
    (the Transformer Engine stand-in's folder) forks from a second server started with them, so
    they are importable as in a fresh ``python``; any other path starts fresh."""
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "standin_probe_module.py").write_text("VALUE = 42\n")
    base = forkserver.base_env()
    env = dict(base, PYTHONPATH=f"{extra}{os.pathsep}{base['PYTHONPATH']}")
    assert forkserver._path_prefix(base) == ""
    assert forkserver._path_prefix(env) == f"{extra}{os.pathsep}"
    assert forkserver._path_prefix(dict(base, PYTHONPATH=str(extra))) is None
    assert forkserver._path_prefix(dict(base, OMP_NUM_THREADS="2")) is None
    script = tmp_path / "probe.py"
    script.write_text("import standin_probe_module\nprint(standin_probe_module.VALUE)\n")
    log = tmp_path / "out.log"
    monkeypatch.setattr(forkserver, "MAX_SERVERS", len(forkserver._SERVERS) + 1)  # room for this one
    try:
        proc = forkserver.popen([str(script)], env=env, log=str(log))
        assert isinstance(proc, forkserver.Child)
        assert proc.wait(timeout=120) == 0 and log.read_text().strip() == "42"
    finally:
        server = forkserver._SERVERS.pop(f"{extra}{os.pathsep}", None)
        if server is not None:
            server.close()
