"""Preemption (SIGTERM), a crash in the middle of a save, non-clobbering of other runs, and
configuration errors raised before any model is built."""

import os
import signal
import subprocess

import pytest
from _infra.launch import ROOT, kill_group
from _infra.training import (
    DEMO,
    FAST,
    losses,
    read_log,
    run_train,
    single_process,
    wait_for_output,
)

HARDENING_WORKER = os.path.join(ROOT, "tests", "_infra", "workers", "hardening_train.py")


def _worker_process(run_dir: str, *overrides: str, env=None) -> subprocess.Popen:
    """``single_process`` through the fault-injection worker (tests/_infra/workers)."""
    return single_process(run_dir, *overrides, env=env, script=HARDENING_WORKER)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"run did not finish in {timeout}s:\n{read_log(proc)[-3000:]}")
    code = proc.returncode
    kill_group(proc)
    return code, read_log(proc)


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = single_process(str(run), "train.steps=50")
    wait_for_output(proc, "step 2/50")
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 0, out
    assert "preempted: saved checkpoint at step" in out
    step = int(out.split("preempted: saved checkpoint at step")[1].split()[0])
    assert step >= 2
    assert open(run / "latest").read().strip() == f"iter_{step:07d}"
    assert not (run / "COMPLETED").exists()
    # and the run resumes from it
    proc = single_process(str(run), "train.steps=50", "train.exit_after_steps=1")
    code, out = _finish(proc)
    assert code == 0 and f"at step {step}" in out, out


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = {"HARDENING_KILL_AT_COMMIT": "4"}
    proc = _worker_process(str(run), "train.steps=6", "checkpoint.save_interval=2", env=env)
    code, out = _finish(proc)
    assert code == -signal.SIGKILL, out
    assert open(run / "latest").read().strip() == "iter_0000002"
    assert (run / "iter_0000004").is_dir()  # the half-written one
    assert not (run / "iter_0000004" / "megatron_ift.json").exists()
    # Resuming uses step 2, redoes the interrupted save and finishes; losses equal a clean run.
    code, out = _finish(single_process(str(run), "train.steps=6", "checkpoint.save_interval=2"))
    assert code == 0 and "at step 2" in out, out
    clean = tmp_path / "clean"
    code, _ = _finish(single_process(str(clean), "train.steps=6", "checkpoint.save_interval=2"))
    assert code == 0
    assert losses(str(run))[-4:] == losses(str(clean))[-4:]
    assert (run / "iter_0000004" / "megatron_ift.json").exists()


@pytest.mark.timeout(900)
def test_refuses_to_overwrite_another_run(tmp_path):
    run = tmp_path / "run"
    base = ["--config", DEMO, f"checkpoint.dir={run}", "parallel.tensor_model_parallel_size=1",
            *FAST, "train.steps=3"]
    r = run_train(base)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_train([*base, "model.num_layers=2"])
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "holds checkpoints of another run" in out, out
    assert "model.num_layers 4 -> 2" in out, out  # names what differs
    r = run_train([*base, "model.num_layers=2", "checkpoint.overwrite=true"])
    assert r.returncode == 0, r.stdout + r.stderr


def _cli(*args, env=None):
    return run_train(["--config", DEMO, *args], env=env, timeout=600)


@pytest.mark.parametrize("args,env,needle", [
    # Key-level validation is covered in-process by tests/unit/test_config.py; these cases go
    # through the CLI and the trainer's pre-build checks (world size, files, hardware).
    (["model.num_layerz=2"], None, "unknown key 'model.num_layerz'"),
    (["data.paths=[nowhere.jsonl]"], None, "data.paths: nowhere.jsonl does not exist"),
    (["parallel.tensor_model_parallel_size=2"], {"WORLD_SIZE": "3"},
     "world size 3 is not divisible by tensor x pipeline x context parallel = 2 x 1 x 1"),
    (["parallel.context_parallel_size=4"], {"WORLD_SIZE": "6"},
     "world size 6 is not divisible by tensor x pipeline x context parallel = 1 x 1 x 4"),
    (["parallel.context_parallel_size=2", "data.seq_length=126"], None,
     "data.seq_length=126 cannot be split for parallel.context_parallel_size=2"),
    (["fp8.enabled=true"], None, "fp8.enabled=true needs NVIDIA Transformer Engine"),
    (["ift.estimator=kth", "ift.k=1000"], None, "ift.k=1000 exceeds model.vocab_size=384"),
    (["optimizer.lr=1e-4", "optimizer.min_lr=1e-3"], None, "optimizer.min_lr=0.001 must be <= 0.0001"),
])
def test_bad_config_fails_before_model_construction(args, env, needle, tmp_path):
    # A world of one: tensor parallel 1 unless the case sets it.
    r = _cli(f"checkpoint.dir={tmp_path}", "parallel.tensor_model_parallel_size=1", *args, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr, r.stderr
    assert "layer spec; TP" not in r.stdout  # nothing was built (no run summary)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr  # one line
