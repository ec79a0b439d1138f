"""slurm/cpu_demo.sbatch on a real (local, one-node) Slurm: train, preempt, requeue, resume.

Needs Debian's slurmctld, slurmd, slurm-client and munge (``bash .ci/install_slurm.sh``) and root;
skipped with that reason otherwise. tests/slurm_cluster.py starts private daemons in a temporary
folder on loopback ports and stops them afterwards, even when a test fails.

Two trainers run through the same batch script: the stand-in (tests/workers/standin_trainer.py,
always) and the real ``megatron_ift.train`` with ``configs/demo.yaml`` (once both exist).
"""

import os
import re
from pathlib import Path

import pytest

from slurm_cluster import free_port, missing_reason, start_cluster, wait_until

ROOT = Path(__file__).resolve().parent.parent
REASON = missing_reason()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]

REAL_TRAINER = (ROOT / "megatron_ift" / "train.py").exists() and \
    (ROOT / "configs" / "demo.yaml").exists()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def _trainer(name, tmp_path):
    """(environment, script arguments) that make cpu_demo.sbatch run trainer ``name``."""
    env = dict(REPO_DIR=str(ROOT), RUN_DIR=str(tmp_path / "run"), MASTER_PORT=str(free_port()))
    if name == "standin":
        config = tmp_path / "standin.yaml"
        config.write_text("standin:\n  step_seconds: 0.1\n")
        env.update(CONFIG=str(config), TRAIN_MODULE="standin_trainer",
                   PYTHONPATH=str(ROOT / "tests" / "workers"))
    # The real trainer with the demo preset (cpu_demo.sbatch's default CONFIG).
    return env, ["checkpoint.save_interval=1000"]


def _node_logs(run_dir: Path, restart: int) -> str:
    logs = sorted((run_dir / "logs").glob(f"*-run{restart}-node*.log"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


TRAINERS = ["standin", pytest.param("megatron_ift", marks=pytest.mark.skipif(
    not REAL_TRAINER, reason="megatron_ift/train.py or configs/demo.yaml not in this tree yet"))]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_batch_job_trains_to_completion(cluster, tmp_path, trainer):
    env, args = _trainer(trainer, tmp_path)
    out = tmp_path / "batch.out"
    # sbatch --wait returns when the job ends, with its exit code.
    job = cluster.sbatch("slurm/cpu_demo.sbatch", "train.steps=8", *args,
                         options=("--wait", f"--output={out}"), env=env, cwd=str(ROOT),
                         timeout=180)
    assert cluster.job_info(job)["JobState"] == "COMPLETED"
    batch = out.read_text()
    assert "1 node(s) x 2 processes" in batch and "training complete" in batch, batch
    assert (tmp_path / "run" / "COMPLETED").exists()
    node_log = _node_logs(tmp_path / "run", 0)
    if trainer == "standin":
        assert "starting from scratch (world size 2)" in node_log
        assert "training complete at step 8" in node_log


@pytest.mark.parametrize("trainer", TRAINERS)
def test_preempted_job_saves_requeues_and_resumes(cluster, tmp_path, trainer):
    env, args = _trainer(trainer, tmp_path)
    run_dir, out = tmp_path / "run", tmp_path / "batch.out"
    steps = 150 if trainer == "standin" else 50
    job = cluster.sbatch("slurm/cpu_demo.sbatch", f"train.steps={steps}", *args,
                         options=(f"--output={out}",), env=env, cwd=str(ROOT))

    # Training is under way: some step after the first has been logged.
    progress = re.compile(r"\bstep\D{0,3}([3-9]|\d{2,})\b", re.I)
    wait_until(lambda: progress.search(_node_logs(run_dir, 0)) if (run_dir / "logs").exists()
               else None, 150, "training progress in the first run's log")
    # What --signal=B:USR1@N does before the time limit: USR1 to the batch shell only.
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))

    # The batch script forwards it, the trainer saves and exits 0, the script requeues the job.
    info = wait_until(lambda: (i := cluster.job_info(job)).get("Restarts") == "1" and i, 120,
                      "the job to be requeued")
    # Slurm holds a requeued job ~2 minutes (Reason=BeginTime); release it, re-issuing the update
    # until it takes (issued too early, the requeue's own begin time overrides it).
    def released():
        if cluster.job_state(job) == "PENDING":
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return False
        return cluster.job_state(job) in ("RUNNING", "COMPLETED", "COMPLETING")

    wait_until(released, 60, "the requeued job to start again", interval=2)
    cluster.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    assert cluster.job_state(job) == "COMPLETED", (info, out.read_text())

    first, second, batch = _node_logs(run_dir, 0), _node_logs(run_dir, 1), out.read_text()
    saved = re.findall(r"preempted: saved checkpoint at step (\d+)", first)
    assert saved and len(set(saved)) == 1, first[-3000:]
    step = int(saved[0])
    assert 0 < step < steps
    assert "batch shell got SIGUSR1" in batch and "requeueing" in batch
    assert batch.count("training step exited with status 0") == 2, batch
    assert "preempted" not in second and (run_dir / "COMPLETED").exists()
    if trainer == "standin":
        assert f"resumed from checkpoint at step {step}" in second
        assert f"training complete at step {steps}" in second
        assert "starting from scratch" not in second
    else:
        assert re.search(rf"(resum|load)\w*\D+{step}\b", second, re.I), second[-3000:]
