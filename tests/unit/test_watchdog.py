"""The watchdog, heartbeats, storage probes and straggler spread, in-process (the real trainer's
hangs, lost ranks and disk faults: tests/distributed/test_no_silent_hangs.py)."""

import errno
import os
import time

import pytest
import torch.distributed as dist

from megatron_ift.platform import Platform
from megatron_ift.training import storage
from megatron_ift.training.heartbeat import PREFIX, Heartbeat
from megatron_ift.training.stragglers import StragglerMonitor
from megatron_ift.training.watchdog import HANGS_DIR, Timeouts, Watchdog


class _Exit(Exception):
    pass


def _watchdog(tmp_path, **timeouts):
    codes = []
    dog = Watchdog(Timeouts(**timeouts), rank=3, run_dir=str(tmp_path), poll_s=0.05,
                   peers=lambda: "missing: rank 1 on nodeX silent for 9 s", exit=codes.append)
    return dog, codes


def _wait(codes, seconds):
    deadline = time.monotonic() + seconds
    while not codes and time.monotonic() < deadline:
        time.sleep(0.02)


def test_no_progress_ends_the_process_with_a_stack_dump(tmp_path, capfd):
    dog, codes = _watchdog(tmp_path, step=0.3)
    dog.start()
    with dog.phase("optimisation pass", 7):
        start = time.monotonic()
        _wait(codes, 5)
    took = time.monotonic() - start
    assert codes == [7] and 0.3 <= took < 2.0
    err = capfd.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("megatron-ift train: no progress")]
    assert len(line) == 1, err
    assert "rank 3 on" in line[0] and "'optimisation pass' of step 7" in line[0]
    assert "missing: rank 1 on nodeX" in line[0] and "exit code 7" in line[0]
    assert "Python stacks of every thread" in err and "test_watchdog.py" in err  # the main thread's frame
    (dump,) = (tmp_path / HANGS_DIR).iterdir()
    assert dump.name.startswith("rank3-") and "optimisation pass" in dump.read_text()
    assert str(dump) in line[0]


def test_progress_keeps_it_quiet_and_stop_ends_it(tmp_path):
    # The step (1.2 s) outlasts the limit (1 s); each part (0.4 s) stays well inside it, with
    # room for a loaded machine's late wake-ups.
    dog, codes = _watchdog(tmp_path, step=1.0)
    dog.start()
    with dog.phase("step", 1):
        for part in ("estimation pass", "optimisation pass", "metric reduction"):
            time.sleep(0.4)
            dog.progress(part)
    dog.step_done(1, 1.2)
    dog.stop()
    time.sleep(1.2)
    assert codes == []


def test_a_preemption_deadline_ends_a_save_that_cannot_finish(tmp_path, capfd):
    dog, codes = _watchdog(tmp_path, step=100, save=100)
    dog.start()
    with dog.phase("save", 12, kind="save"):
        dog.deadline(0.3, "SIGTERM (save and exit within 0 s)")
        _wait(codes, 5)
    assert codes == [7]
    assert "could not finish after SIGTERM" in capfd.readouterr().err


def test_derived_limits_follow_measured_steps_and_saves(tmp_path):
    dog, _ = _watchdog(tmp_path)
    assert dog.limit("step") == 1800 and dog.limit("save") == 900  # nothing measured yet
    dog.step_done(1, 5.0)
    assert dog.limit("step") == 600  # the floor
    dog.step_done(2, 100.0)
    assert dog.limit("step") == 1000
    with dog.phase("save", 2, kind="save"):
        time.sleep(0.01)
    assert dog.limit("save") == 900  # a quick save: the floor
    fixed, _ = _watchdog(tmp_path, step=7, save=9)
    fixed.step_done(1, 100.0)
    assert (fixed.limit("step"), fixed.limit("save")) == (7, 9)


def test_heartbeats_name_the_rank_that_went_silent():
    store = dist.HashStore()
    me = Heartbeat(0, 3, phase=lambda: "phase 'step' of step 4", interval_s=0.05, stale_s=0.4,
                   store=store)
    store.set(f"{PREFIX}1", "1|node-b|phase 'save' of step 4")  # rank 1 beat once, then stopped
    me.start()
    time.sleep(0.2)
    assert me.missing() == "missing: rank(s) 2 never reported"
    for n in range(12):  # rank 2 keeps beating, rank 1 stays silent
        store.set(f"{PREFIX}2", f"{n}|node-c|phase 'step' of step 4")
        time.sleep(0.05)
    found = me.wait_for_missing(2.0)
    me.stop()
    assert found.startswith("missing: rank 1 on node-b silent for") and "phase 'save' of step 4" in found
    assert "rank 2" not in found


def test_storage_probe_and_cause_chain(tmp_path):
    assert storage.probe(str(tmp_path / "fine")) is None
    assert not list((tmp_path / "fine").iterdir())  # the probe file is removed
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    try:
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("writing failed") from inner
    except RuntimeError as outer:
        assert storage.storage_oserror(outer) is full
    assert storage.describe(full).endswith("metrics.jsonl: no space left on the device (ENOSPC)")
    assert storage.storage_oserror(OSError(errno.ENOENT, "gone")) is None


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"),
                    reason="needs unshare(1) as root for a size-limited tmpfs")
def test_storage_probe_names_a_full_disk(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from megatron_ift.training import storage; "
            "print(storage.probe(sys.argv[1]))")
    script = (f"mount -t tmpfs -o size=512k tmpfs {tmp_path} && "
              f"{sys.executable} -c '{code}' {tmp_path}")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.stdout.strip() == "no space left on the device (ENOSPC)", out.stderr[-2000:]


def test_straggler_monitor_is_silent_without_a_group():
    monitor = StragglerMonitor(Platform(), interval=1, group=None)
    finalize = monitor.wrap_finalize(lambda *a: "done")
    monitor.step_started()
    assert finalize() == "done"
    assert monitor.step_finished(1) is None
