"""No silent hangs: the real trainer, made to hang, lose a rank or run out of disk, ends within its
configured time with one line naming the rank and phase, keeps ``latest`` on a complete
checkpoint, and that checkpoint resumes to the losses of an uninterrupted run.

Every case runs the demo preset at TP 1 (one process, or two data-parallel ranks) with a constant
learning rate, so a resumed run with a different ``train.steps`` keeps the same schedule
(``checkpoint.override_scheduler``) and its losses can be compared step by step with one
uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from _infra import forkserver
from _infra.launch import ROOT, start_world, torchrun
from _infra.training import DEMO, FAST, losses, single_process, wait_for_output

pytestmark = [pytest.mark.slow]

BASE = [*FAST, "parallel.tensor_model_parallel_size=1", "optimizer.lr_decay_style=constant",
        "optimizer.lr_warmup_steps=0", "optimizer.lr=3e-3", "logging.tensorboard=false",
        "checkpoint.save_interval=2"]
HARDENING_WORKER = os.path.join(ROOT, "tests", "_infra", "workers", "hardening_train.py")
REFERENCE_STEPS = 8
MARGIN_S = 25  # process teardown and a loaded CI machine


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of the uninterrupted run (one process; data-parallel ranks see the same global
    batches, to float32 rounding)."""
    run = tmp_path_factory.mktemp("hang_ref") / "run"
    torchrun("train_cli.py", 1, "--config", DEMO, f"checkpoint.dir={run}", *BASE,
             f"train.steps={REFERENCE_STEPS}")
    return losses(str(run))


def _latest_step(run) -> int:
    name = (run / "latest").read_text().strip()
    assert (run / name / "megatron_ift.json").is_file(), f"latest names an incomplete {name}"
    return int(name.split("_")[1])


def _assert_resumes(run, reference, nproc: int = 1) -> None:
    """``latest`` is complete, and resuming from it reproduces the reference's next losses."""
    start = _latest_step(run)
    resumed = run.parent / "resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("hangs", "run.lock"))
    (resumed / "metrics.jsonl").unlink()
    out = torchrun("train_cli.py", nproc, "--config", DEMO, f"checkpoint.dir={resumed}", *BASE,
                   f"train.steps={start + 2}", "checkpoint.override_scheduler=true")
    assert f"resumed from {resumed}" in out and f"iter_{start:07d}" in out, out[-2000:]
    assert losses(str(resumed)) == pytest.approx(reference[start:start + 2], rel=1e-5)


def _one_line(text: str, prefix: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, text[-4000:]
    return lines[0]


def _stack_dump(run) -> str:
    dumps = list((run / "hangs").iterdir())
    assert dumps, "no stack dump in the run folder"
    text = dumps[0].read_text()
    assert "File " in text and "line " in text, text[:2000]  # faulthandler's frames
    return text


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_a_paused_rank_ends_the_job_naming_it(tmp_path, reference):
    run = tmp_path / "run"
    world = start_world("train_cli.py", 2, "--config", DEMO, f"checkpoint.dir={run}", *BASE,
                        "train.steps=500", "train.hang_timeout_s=8", logs=str(tmp_path))
    try:
        world.wait_for("saved checkpoint at step 2", timeout=300)
        os.kill(world.procs[1].pid, signal.SIGSTOP)  # a stuck GPU, a wedged node
        start = time.monotonic()
        failure = world.wait(timeout=8 + MARGIN_S + 30)
        waited = time.monotonic() - start
    finally:
        world.kill()  # the paused rank too (torchrun and Slurm do the same)
    assert "rank 0 exit 7" in failure and waited < 8 + MARGIN_S, (failure, waited)
    line = _one_line(world.output(0), "megatron-ift train: no progress:")
    assert "rank 0 on" in line and "made no progress for" in line and "of step" in line
    assert "missing: rank 1 on" in line and "silent for" in line, line
    _stack_dump(run)
    _assert_resumes(run, reference)


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_a_killed_rank_ends_the_job_naming_it(tmp_path, reference):
    run = tmp_path / "run"
    world = start_world("train_cli.py", 2, "--config", DEMO, f"checkpoint.dir={run}", *BASE,
                        "train.steps=500", "train.hang_timeout_s=8", logs=str(tmp_path))
    try:
        world.wait_for("saved checkpoint at step 2", timeout=300)
        os.kill(world.procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        code = world.procs[0].wait(timeout=8 + MARGIN_S + 30)  # rank 0 on its own (no launcher)
        waited = time.monotonic() - start
    finally:
        world.kill()
    assert code == 7 and waited < 8 + MARGIN_S, (code, waited, world.output(0)[-3000:])
    line = _one_line(world.output(0), "megatron-ift train: rank lost:")
    assert "missing: rank 1 on" in line and "in a collective" in line, line
    _stack_dump(run)
    _assert_resumes(run, reference)


def _held_saves(tmp_path, *overrides):
    held = tmp_path / "held"
    held.mkdir()
    env = dict(HARDENING_HOLD_WRITERS=str(held), HARDENING_HOLD_AFTER="1")
    proc = single_process(str(tmp_path / "run"), *BASE, "train.steps=500", *overrides, env=env,
                          script=HARDENING_WORKER)
    deadline = time.monotonic() + 300
    while not list(held.iterdir()):  # the second save's writer has written and now holds
        assert proc.poll() is None and time.monotonic() < deadline, open(proc.log_path).read()[-3000:]
        time.sleep(0.1)
    return proc, [int(p.name) for p in held.iterdir()]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waits for init only
    except OSError:
        return True


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_a_paused_save_helper_ends_the_job(tmp_path, reference):
    proc, writers = _held_saves(tmp_path, "checkpoint.save_timeout_s=6")
    for pid in writers:
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    code = proc.wait(timeout=6 + MARGIN_S + 30)
    assert code == 7 and time.monotonic() - start < 6 + MARGIN_S
    line = _one_line(open(proc.log_path).read(), "megatron-ift train: no progress:")
    assert "phase 'save' of step 4" in line, line
    time.sleep(1)
    assert all(_gone(pid) for pid in writers), "a checkpoint writer outlived the trainer"
    _stack_dump(tmp_path / "run")
    assert _latest_step(tmp_path / "run") == 2
    _assert_resumes(tmp_path / "run", reference)


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_sigterm_while_the_save_is_stuck_ends_before_the_kill(tmp_path, reference):
    proc, writers = _held_saves(tmp_path, "checkpoint.sigterm_timeout_s=4",
                                "checkpoint.save_timeout_s=600")
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before its KillWait and SIGKILL
    start = time.monotonic()
    code = proc.wait(timeout=4 + MARGIN_S + 30)
    assert code == 7 and time.monotonic() - start < 4 + MARGIN_S
    line = _one_line(open(proc.log_path).read(), "megatron-ift train: no progress:")
    assert "could not finish after SIGTERM" in line and "phase 'save' of step 4" in line, line
    _stack_dump(tmp_path / "run")
    assert _latest_step(tmp_path / "run") == 2
    _assert_resumes(tmp_path / "run", reference)


def _in_a_private_mount(tmp_path, mount: str, body: str) -> tuple[int, str]:
    """Run ``python -m megatron_ift.train`` inside ``unshare -rm`` (a user and mount namespace:
    real kernel errors from a size-limited tmpfs or a read-only bind mount, without root on the
    host); the run folder is copied out afterwards."""
    run = tmp_path / "run"
    run.mkdir()
    log = tmp_path / "train.log"
    train = " ".join([sys.executable, "-m", "megatron_ift.train", "--config", DEMO,
                      f"checkpoint.dir={run}", *BASE, "train.steps=500"])
    script = f"""
set -u
{mount}
{train} > {log} 2>&1 &
pid=$!
{body}
wait $pid; code=$?
cp -a {run} {tmp_path}/kept
exit $code
"""
    env = forkserver.base_env()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=ROOT, timeout=600,
                          capture_output=True, text=True)
    return proc.returncode, log.read_text() + proc.stderr


needs_unshare = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                   reason="needs unshare(1) as root (user and mount namespaces)")


@needs_unshare
@pytest.mark.dist
@pytest.mark.timeout(900)
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, reference):
    # 16 MiB: the demo's checkpoints take 11 MiB: the first fits, the second does not
    code, out = _in_a_private_mount(tmp_path, f"mount -t tmpfs -o size=16m tmpfs {tmp_path}/run", "")
    assert code == 8, out[-3000:]
    line = _one_line(out, "megatron-ift train: storage error:")
    assert "iter_0000004: no space left on the device (ENOSPC)" in line, line
    assert "the previous complete checkpoint iter_0000002 stays latest" in line, line
    kept = tmp_path / "kept"
    assert not (kept / "iter_0000004").exists()  # nothing half-written is left
    _assert_resumes(kept, reference)


@needs_unshare
@pytest.mark.dist
@pytest.mark.timeout(900)
def test_a_read_only_run_folder_ends_with_one_line(tmp_path, reference):
    code, out = _in_a_private_mount(
        tmp_path, f"mount --bind {tmp_path}/run {tmp_path}/run",
        f"until grep -q 'saved checkpoint at step 2' {tmp_path}/train.log; do sleep 0.05; done\n"
        f"mount -o remount,bind,ro {tmp_path}/run")
    assert code == 8, out[-3000:]
    line = _one_line(out, "megatron-ift train: storage error:")
    assert "read-only file system (EROFS)" in line, line
    _assert_resumes(tmp_path / "kept", reference)


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_a_straggler_is_named_in_the_log_and_the_metrics(tmp_path):
    run = tmp_path / "run"
    out = torchrun("train_slow_rank.py", 2, "--config", DEMO, f"checkpoint.dir={run}", *BASE,
                   "train.steps=4", "logging.straggler_interval=2", "logging.straggler_factor=1.5",
                   env={"SLOW_RANK": "1", "SLOW_SECONDS": "0.3"})
    assert "straggler: rank 1 on" in out and "x the median compute time per step" in out, out[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gathered = [r for r in records if "slowest_rank" in r]
    assert [r["step"] for r in gathered] == [2, 4]
    for r in gathered:
        assert r["slowest_rank"] == 1 and r["compute_time_max"] > 1.5 * r["compute_time_min"], r
        assert r["compute_time_min"] <= r["compute_time_median"] <= r["compute_time_max"]
