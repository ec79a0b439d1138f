"""slurm/cpu_demo.sbatch on a real (local, one-node) Slurm: train, preempt, requeue, resume.

Needs Debian's slurmctld, slurmd, slurm-client and munge (``bash .ci/install_slurm.sh``) and root;
skipped with that reason otherwise. tests/_infra/slurm_cluster.py starts private daemons in a temporary
folder on loopback ports and stops them afterwards, even when a test fails.

The trainer is the real ``megatron_ift.train`` with ``configs/demo.yaml`` (2 processes, gloo,
tensor parallel 2), or the stand-in of tests/_infra/workers/standin_trainer.py where those are absent.
"""

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _infra import ROOT as _INFRA_ROOT
from _infra.launch import free_port
from _infra.slurm_cluster import missing_reason, start_cluster, wait_until

ROOT = Path(_INFRA_ROOT)
REASON = missing_reason()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]

REAL_TRAINER = (ROOT / "megatron_ift" / "train.py").exists() and \
    (ROOT / "configs" / "demo.yaml").exists()
#: The real trainer with the demo preset once it exists; until then the stand-in, which obeys the
#: same contract (tests/_infra/workers/standin_trainer.py). MEGATRON_IFT_SLURM_TRAINER=standin picks the
#: stand-in anyway, to tell a harness failure from a trainer failure.
TRAINER = os.environ.get("MEGATRON_IFT_SLURM_TRAINER") or (
    "megatron_ift" if REAL_TRAINER else "standin")
#: Steps of the run (the real demo takes ~1 s a step here; the stand-in 0.1 s).
STEPS = {"megatron_ift": 12, "standin": 150}[TRAINER]
#: Log every step (the test follows progress by the ``step N/M`` lines), a warm-up that fits the
#: short run, nothing else.
ARGS = {"megatron_ift": ["logging.log_interval=1", "logging.tensorboard=false",
                         "logging.progress_bar=false", "optimizer.lr_warmup_steps=2"],
        "standin": []}[TRAINER]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture
def job_env(tmp_path, cluster):
    """Environment that makes cpu_demo.sbatch train TRAINER into tmp_path/run."""
    env = dict(REPO_DIR=str(ROOT), RUN_DIR=str(tmp_path / "run"), MASTER_PORT=str(free_port()))
    if TRAINER == "standin":
        config = tmp_path / "standin.yaml"
        config.write_text("standin:\n  step_seconds: 0.1\n")
        env.update(CONFIG=str(config), TRAIN_MODULE="standin_trainer",
                   PYTHONPATH=str(ROOT / "tests" / "_infra" / "workers"))
    yield env
    cluster.cancel_all()  # nothing of this test may hold the node for the next one


def _node_logs(run_dir: Path, restart: int) -> str:
    logs = sorted((run_dir / "logs").glob(f"*-run{restart}-node*.log"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


def test_batch_job_is_preempted_requeued_and_resumes_to_completion(cluster, tmp_path, job_env):
    """One job, submitted with ``sbatch --wait``: it trains, gets the pre-timeout signal, saves,
    requeues itself, resumes from its checkpoint in the second run and completes."""
    steps = STEPS
    run_dir, out = tmp_path / "run", tmp_path / "batch.out"
    with ThreadPoolExecutor(max_workers=1) as pool:
        # sbatch --wait returns when the job has finally ended; a requeue does not end it.
        # (Bounded below pytest's 300 s per-test timeout.)
        submitted = pool.submit(cluster.sbatch_wait, "slurm/cpu_demo.sbatch",
                                f"train.steps={steps}", "checkpoint.save_interval=1000", *ARGS,
                                options=(f"--output={out}", "--job-name=ift-slurm-test"),
                                env=job_env, cwd=str(ROOT), timeout=270)
        try:
            # Training is under way: step 3 (or later) has been logged.
            progress = re.compile(r"^step ([3-9]|\d{2,})/", re.M)
            wait_until(lambda: submitted.done() or (
                progress.search(_node_logs(run_dir, 0)) if (run_dir / "logs").exists()
                else None), 150, "training progress in the first run's log")
            if submitted.done():  # sbatch's own error (raised by result()) or the job's output
                result = submitted.result()
                batch = out.read_text() if out.exists() else "(no batch output)"
                pytest.fail(f"the job ended before the signal: {result}\n{batch}")
            job = int(cluster.run("squeue", "--noheader", "--format=%i",
                                  "--name=ift-slurm-test").stdout.split()[0])
            # What --signal=B:USR1@N does before the time limit: USR1 to the batch shell only.
            cluster.run("scancel", "--batch", "--signal=USR1", str(job))

            # The batch script forwards it, the trainer saves and exits 0, the script requeues.
            wait_until(lambda: cluster.job_info(job).get("Restarts") == "1", 90,
                       "the job to be requeued")
            # Slurm holds a requeued job ~2 minutes (BeginTime). Release it, but not within the
            # second of the requeue: slurmd rejects a launch whose credential is as old as the
            # revocation of the first run's.
            time.sleep(3)
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
            job_id, code = submitted.result()
        finally:
            if not submitted.done():
                cluster.cancel_all()  # ends sbatch --wait, so that the pool can shut down
    batch = out.read_text()
    assert job_id == job and code == 0 and cluster.job_state(job) == "COMPLETED", batch

    first, second = _node_logs(run_dir, 0), _node_logs(run_dir, 1)
    assert "1 node(s) x 2 processes" in batch and "step 1/" in first
    saved = re.findall(r"preempted: saved checkpoint at step (\d+)", first)
    assert saved and len(set(saved)) == 1, first[-3000:]  # every rank agreed on the step
    step = int(saved[0])
    assert 3 <= step < steps
    assert "batch shell got SIGUSR1" in batch and "requeueing" in batch
    assert batch.count("training step exited with status 0") == 2, batch
    assert "training complete" in batch
    assert "preempted: saved" not in second and f"step {steps}/{steps}" in second
    assert re.search(rf"resumed from \S+ at step {step}\b", second), second[-3000:]
    assert not re.search(r"^step [1-3]/", second, re.M), "the second run started over"
    assert (run_dir / "COMPLETED").read_text().strip() == str(steps)
