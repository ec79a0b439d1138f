"""Hardening of ``megatron-ift train`` with real (short, world-of-one) runs: a damaged checkpoint
is never kept as ``latest``, changed options on resume are refused or applied (never ignored),
a divergence ends with the non-finite policy, Ctrl-C saves, a killed trainer leaves no child,
a live run's folder is refused, and the ``--config`` file is never overwritten."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from _infra import forkserver
from _infra.launch import ROOT
from _infra.training import (
    DEMO,
    FAST,
    losses,
    metrics,
    read_log,
    run_train,
    single_process,
    wait_for_output,
)

WORKER = os.path.join(ROOT, "tests", "_infra", "workers", "hardening_train.py")
# One data file and short steps keep every run to a few seconds of work after start-up.
SMALL = ["parallel.tensor_model_parallel_size=1", "data.paths=[data/sft_pairs.jsonl]",
         "logging.progress_bar=false", "logging.tensorboard=false", *FAST,
         "optimizer.lr_warmup_steps=1"]


def _cmd(run, *overrides, config=DEMO):
    return [WORKER, "--config", str(config), f"checkpoint.dir={run}", *SMALL, *overrides]


@pytest.fixture
def train():
    """A world-of-one ``megatron-ift train`` run to its end: ``train(run, *overrides, config=)``
    returns its ``CompletedProcess`` (``train_utils.run_train``)."""
    return lambda run, *overrides, config=DEMO: run_train(
        ["--config", str(config), f"checkpoint.dir={run}", *SMALL, *overrides])


def start(run, *overrides, env=None):
    """A run left going (``train_utils.single_process`` with the fault hooks and SMALL), for
    signals; its output is ``read_log(proc)``."""
    return single_process(str(run), *SMALL, *overrides, env=env, script=WORKER)


def _one_line_error(r: subprocess.CompletedProcess, code: int, needle: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == code, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("megatron-ift train:")]
    assert len(errs) == 1 and needle in errs[0], r.stderr[-3000:]
    return errs[0]


def test_damaged_checkpoint_is_reported_and_never_kept_as_latest(tmp_path, train):
    run = tmp_path / "run"
    r = train(run, "train.steps=2", "checkpoint.save_interval=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # No Transformer Engine / apex / deprecation noise on a CPU run; a summary, not the YAML.
    assert "not installed" not in r.stderr and "deprecated" not in r.stderr, r.stderr[-3000:]
    assert "megatron-ift train: IFT (greedy" in r.stdout and "\nmodel:\n" not in r.stdout
    assert (run / "config.yaml").exists()
    good = {p.name: p.stat().st_size for p in (run / "iter_0000002").iterdir()}
    shard = run / "iter_0000002" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(good["__0_0.distcp"] // 2)
    # Resuming the damaged step-2 checkpoint: one line, naming the earlier one and the fix.
    r = train(run, "train.steps=2", "checkpoint.save_interval=1")
    _one_line_error(r, 4, "could not load")
    assert ("Earlier complete checkpoints: iter_0000001; to resume from iter_0000001, write "
            f"'iter_0000001' into {run / 'latest'}") in r.stderr
    # A deleted shard: the same one line (torch's CheckpointException is a BaseException).
    shard.rename(tmp_path / "shard.bak")
    r = train(run, "train.steps=2", "checkpoint.save_interval=1")
    _one_line_error(r, 4, "could not load")
    assert "Earlier complete checkpoints: iter_0000001" in r.stderr
    # A deleted common.pt is named as such (not "'str' object has no attribute 'iterdir'").
    common = (run / "iter_0000002" / "common.pt").read_bytes()
    (run / "iter_0000002" / "common.pt").unlink()
    r = train(run, "train.steps=2", "checkpoint.save_interval=1")
    _one_line_error(r, 4, "iter_0000002 is damaged: its common.pt is missing")
    (run / "iter_0000002" / "common.pt").write_bytes(common)
    # Follow the advice: resume from step 1. The step-2 save must replace the damaged folder.
    (run / "latest").write_text("iter_0000001\n")
    r = train(run, "train.steps=2", "checkpoint.save_interval=1")
    assert r.returncode == 0 and "resumed from" in r.stdout and "at step 1" in r.stdout, r.stderr[-3000:]
    assert (run / "latest").read_text().strip() == "iter_0000002"
    assert (run / "iter_0000002" / "__0_0.distcp").stat().st_size == good["__0_0.distcp"]
    assert not (run / "iter_0000002.replaced").exists()
    # ... and it loads (the run is complete: it only resumes and stops).
    r = train(run, "train.steps=2", "checkpoint.save_interval=1")
    assert r.returncode == 0 and "resumed from" in r.stdout and "at step 2" in r.stdout, r.stderr[-3000:]


def _cosine_lr(step, *, lr, min_lr, warmup, total):
    """megatron-core's cosine schedule after warm-up (the lr logged after ``step`` updates)."""
    ratio = (step - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def test_resume_refuses_a_changed_schedule_or_applies_it_when_asked(tmp_path, train):
    run = tmp_path / "run"
    r = train(run, "train.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    # A second run (another process forked from the same server) computes the same losses.
    again = train(tmp_path / "again", "train.steps=2")
    assert again.returncode == 0 and losses(str(tmp_path / "again")) == losses(str(run))
    # Resume with the run folder's own config.yaml as --config: it must not be overwritten.
    saved = run / "config.yaml"
    text = saved.read_text()
    # A finished run, more steps and a new lr: refused, naming each key and the choice.
    r = train(run, "train.steps=4", "optimizer.lr=1e-3", config=saved)
    err = _one_line_error(r, 2, "optimizer.lr 0.003 -> 0.001, train.steps 2 -> 4 changed")
    assert "checkpoint.override_scheduler=true" in err
    # Optimizer-state options cannot change at all.
    r = train(run, "optimizer.adam_beta2=0.99", config=saved)
    _one_line_error(r, 2, "optimizer.adam_beta2 0.95 -> 0.99 changed, but the optimizer state")
    # With the flag: the new schedule from step 2 on; dropout reported as a run-time option.
    r = train(run, "train.steps=4", "optimizer.lr=1e-3", "checkpoint.override_scheduler=true",
              "model.hidden_dropout=0.1", config=saved)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ("resume: new schedule applied (checkpoint.override_scheduler): optimizer.lr 0.003 -> "
            "0.001, train.steps 2 -> 4") in r.stdout
    assert "resume: run-time model options changed, applied: model.hidden_dropout 0.0 -> 0.1" in r.stdout
    assert "architecture" not in r.stdout + r.stderr
    lrs = {m["step"]: m["lr"] for m in metrics(str(run))}
    for step in (3, 4):  # demo: min_lr 3e-4; one warm-up step
        expect = _cosine_lr(step, lr=1e-3, min_lr=3e-4, warmup=1, total=4)
        assert lrs[step] == pytest.approx(expect, rel=1e-9, abs=0), (step, lrs)
    assert saved.read_text() == text  # the user's --config is untouched ...
    resolved = run / "config.resolved.yaml"  # ... the resolved one is beside it
    assert "steps: 4" in resolved.read_text() and "override_scheduler: true" in resolved.read_text()
    assert (run / "COMPLETED").read_text().strip() == "4"


def test_divergence_ends_with_the_nonfinite_policy(tmp_path, train):
    run = tmp_path / "run"
    r = train(run, "train.steps=6", "optimizer.lr=1e30", "optimizer.clip_grad=0",
              "train.nonfinite_policy=stop", "optimizer.lr_warmup_steps=0")
    err = _one_line_error(r, 6, "training stopped: non-finite loss/gradient at step")
    assert "IndexError" not in r.stdout + r.stderr
    assert "update skipped" in r.stdout, r.stdout[-2000:]
    assert "train.nonfinite_policy=stop" in err


def test_ctrl_c_saves_and_a_second_ctrl_c_aborts(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "train.steps=50", "logging.log_interval=1")
    wait_for_output(proc, "step 2/50", timeout=240)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=240)
    out = read_log(proc)
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    step = int(out.split("preempted: saved checkpoint at step")[1].split()[0])
    assert (run / "latest").read_text().strip() == f"iter_{step:07d}"
    assert not (run / "run.lock").exists()
    # Resume, then two Ctrl-C in a row: abort at once, exit 130, latest unchanged.
    proc = start(run, "train.steps=50", "logging.log_interval=1")
    wait_for_output(proc, f"step {step + 1}/50", timeout=240)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=240)
    out = read_log(proc)
    assert proc.returncode == 130, out[-3000:]
    assert "megatron-ift train: interrupted" in out and "Traceback" not in out, out[-3000:]
    assert (run / "latest").read_text().strip() == f"iter_{step:07d}"


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.add(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_trainer_leaves_no_child_holding_its_stdout(tmp_path):
    run, held = tmp_path / "run", tmp_path / "held"
    held.mkdir()
    # a real process with a real pipe: what is checked is who holds the pipe
    env = dict(forkserver.base_env(), HARDENING_HOLD_WRITERS=str(held))
    proc = subprocess.Popen([sys.executable, *_cmd(run, "train.steps=2")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(os.listdir(held)) < 2:  # both writer processes of the save are sleeping
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        children = _children(proc.pid)
        writers = {int(p) for p in os.listdir(held)}
        assert writers <= children and len(children) >= 3, (writers, children)  # + results manager
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 5
        while any(_alive(c) for c in children) and time.time() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if _alive(c)], "children outlived the killed trainer"
        # Nobody holds the pipe any more: a reader sees end-of-file (``| tee`` would end).
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "the trainer's stdout is still held open"
        proc.stdout.read()  # returns at end-of-file
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_live_run_keeps_its_folder(tmp_path, train):
    run = tmp_path / "run"
    run.mkdir()
    parent = os.getppid()  # a live process on this host stands in for the other run
    with open(f"/proc/{parent}/stat") as f:
        start_time = f.read().rsplit(")", 1)[1].split()[19]
    holder = {"host": socket.gethostname(), "pid": parent, "start": start_time, "since": "06:00"}
    (run / "run.lock").write_text(json.dumps(holder))
    r = train(run, "train.steps=2")
    _one_line_error(r, 2, f"checkpoint.dir={run} is in use by another run (pid {parent} on "
                    f"{socket.gethostname()} since 06:00")
    assert sorted(os.listdir(run)) == ["run.lock"]  # nothing written
    r = train(run, "train.steps=2", "checkpoint.break_lock=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run / "run.lock").exists()  # released at the end


def test_tokenizer_problems_are_refused_before_the_data_is_built(tmp_path, train):
    empty = tmp_path / "tokenizer"
    empty.mkdir()
    r = train(tmp_path / "a", f"data.tokenizer_path={empty}")
    _one_line_error(r, 3, f"data error: cannot load a tokenizer from '{empty}'")
    r = train(tmp_path / "b", "model.vocab_size=100", "model.make_vocab_size_divisible_by=4")
    _one_line_error(r, 2, "the tokenizer at 'data/tokenizer' has 384 token ids but model.vocab_size is 100")
    assert "tokenising" not in r.stdout + r.stderr  # refused before the data build
