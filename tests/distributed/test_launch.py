"""launch/*.sh: the torchrun commands they build, and real CPU runs of a stand-in trainer.

The stand-in (tests/_infra/workers/standin_trainer.py) obeys the trainer's launch contract (config +
overrides, resume, save-and-exit-0 on SIGUSR1/SIGTERM, COMPLETED), so these runs check the
launchers' torchrun flags, rendezvous and signal handling on torch 2.13 without the real model.
"""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from _infra import ROOT
from _infra.launch import free_port

SINGLE = os.path.join(ROOT, "launch", "train_single_node.sh")
MULTI = os.path.join(ROOT, "launch", "train_multi_node.sh")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NNODES", "RDZV_"))}
    env.update(TORCHRUN=TORCHRUN, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "standin.yaml"
    path.write_text("train:\n  steps: 6\nstandin:\n  step_seconds: 0.05\n")
    return path


def _dry(script, *args, **env):
    proc = subprocess.run(["bash", script, *args], env=_env(DRY_RUN=1, **env),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def test_single_node_command(config):
    cmd = _dry(SINGLE, str(config), "optimizer.lr=1e-5", "data.name=a b", NPROC_PER_NODE=4)
    assert cmd[0] == TORCHRUN
    assert {"--standalone", "--nnodes=1", "--nproc-per-node=4", "--max-restarts=0"} <= set(cmd)
    # Outside Slurm torchrun forwards USR1 (save and exit) to its workers.
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in cmd
    module_at = cmd.index("-m")
    assert cmd[module_at + 1:] == ["megatron_ift.train", "--config", str(config),
                                   "optimizer.lr=1e-5", "data.name=a b"]


def test_multi_node_static_and_c10d_rendezvous(config):
    static = _dry(MULTI, str(config), NNODES=4, NODE_RANK=2, MASTER_ADDR="node0",
                  MASTER_PORT=29500, NPROC_PER_NODE=8)
    assert {"--nnodes=4", "--nproc-per-node=8", "--node-rank=2", "--master-addr=node0",
            "--master-port=29500"} <= set(static)
    c10d = _dry(MULTI, str(config), NNODES=4, RDZV_ENDPOINT="node0:29400", RDZV_ID="job7",
                NPROC_PER_NODE=8)
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=job7"} <= set(c10d)
    assert not any(a.startswith(("--node-rank", "--master-addr")) for a in c10d)


@pytest.mark.parametrize("env, message", [
    (dict(NNODES=2, MASTER_ADDR="h", MASTER_PORT=1), "NODE_RANK"),
    (dict(NNODES=2, NODE_RANK=0, MASTER_PORT=1), "MASTER_ADDR"),
    (dict(NODE_RANK=0, MASTER_ADDR="h", MASTER_PORT=1), "NNODES"),
])
def test_multi_node_names_the_missing_variable(config, env, message):
    proc = subprocess.run(["bash", MULTI, str(config)], env=_env(DRY_RUN=1, **env),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and message in proc.stderr


def test_missing_config_prints_usage():
    proc = subprocess.run(["bash", SINGLE, "nope.yaml"], env=_env(DRY_RUN=1),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "config file 'nope.yaml' not found" in proc.stderr
    proc = subprocess.run(["bash", SINGLE], env=_env(DRY_RUN=1), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def _standin_env(**extra):
    return _env(TRAIN_MODULE="standin_trainer",
                PYTHONPATH=os.path.join(ROOT, "tests", "_infra", "workers"), **extra)


def _wait_for(proc, needle, log, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not seen within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.mark.dist
def test_single_node_usr1_saves_then_a_rerun_resumes(tmp_path, config):
    """USR1 to torchrun (outside Slurm) reaches both workers; they save and exit; a rerun of the
    same command resumes from that checkpoint and completes."""
    ckpt = tmp_path / "ckpt"
    args = ["bash", SINGLE, str(config), "train.steps=400", f"checkpoint.dir={ckpt}"]
    log = tmp_path / "run1.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=_standin_env(NPROC_PER_NODE=2), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_for(proc, "step 3/", log, timeout=90)
        proc.send_signal(signal.SIGUSR1)  # the launcher exec'd torchrun: same pid
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    saved = {line.split("at step ")[1] for line in text.splitlines()
             if "preempted: saved checkpoint at step" in line}
    assert text.count("preempted: saved checkpoint") == 2, text[-3000:]
    assert len(saved) == 1, saved  # both ranks agreed on the step
    step = int(saved.pop())
    assert 3 <= step < 400 and not (ckpt / "COMPLETED").exists()

    rerun = subprocess.run(args[:3] + [f"train.steps={step + 4}", f"checkpoint.dir={ckpt}"],
                           env=_standin_env(NPROC_PER_NODE=2), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in rerun.stdout
    assert f"step {step + 1}/{step + 4}" in rerun.stdout and "step 1/" not in rerun.stdout
    assert (ckpt / "COMPLETED").read_text().strip() == str(step + 4)


@pytest.mark.dist
def test_two_nodes_static_rendezvous_on_localhost(tmp_path, config):
    """Two launcher instances (node ranks 0 and 1, one process each) form a world of 2."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = _standin_env(NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                           NPROC_PER_NODE=1)
        procs.append(subprocess.Popen(["bash", MULTI, str(config),
                                       f"checkpoint.dir={tmp_path / 'ckpt'}"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert "starting from scratch (world size 2)" in outs[0]
    assert "training complete at step 6" in outs[0]
    assert (tmp_path / "ckpt" / "COMPLETED").exists()
