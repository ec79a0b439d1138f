"""Resume equivalence, resharding and tensorboard output of real `megatron-ift train` runs.

Straight runs of 6 steps against runs stopped after 3 steps (``train.exit_after_steps``, which
saves a checkpoint) and resumed: float32 on CPU, the resumed losses are bit-identical at the
same layout; at another layout (TP 2 -> PP 2, TP 2 -> CP 2, distributed optimizer) within 1e-5.
The demo at CP 2 x TP 2 (4 processes) logs the TP 2 losses within 1e-5.
"""

import os
import shutil

import pytest
from _infra.training import losses, train

# over a minute with the module fixture (tests/_infra/plugin.py orders slow files first)
pytestmark = [pytest.mark.slow]

STEPS = ["train.steps=6", "parallel.use_distributed_optimizer=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    out = {}
    train(2, str(d / "tp2_straight"), *STEPS)
    train(2, str(d / "tp2_split"), *STEPS, "train.exit_after_steps=3")
    shutil.copytree(d / "tp2_split", d / "tp2_to_pp2")
    shutil.copytree(d / "tp2_split", d / "tp2_to_cp2")
    out["resume_log"] = train(2, str(d / "tp2_split"), *STEPS)
    out["reshard_log"] = train(2, str(d / "tp2_to_pp2"), *STEPS,
                               "parallel.tensor_model_parallel_size=1",
                               "parallel.pipeline_model_parallel_size=2")
    out["cp_log"] = train(2, str(d / "tp2_to_cp2"), *STEPS,
                          "parallel.tensor_model_parallel_size=1", "parallel.context_parallel_size=2")
    train(4, str(d / "cp2_tp2_straight"), *STEPS, "parallel.context_parallel_size=2")
    out["dir"] = d
    return out


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_resume_is_bit_identical_tp2(runs):
    d = runs["dir"]
    assert "resumed from" in runs["resume_log"]
    straight, split = losses(str(d / "tp2_straight")), losses(str(d / "tp2_split"))
    assert len(straight) == len(split) == 6
    assert split == straight


@pytest.mark.dist
@pytest.mark.parametrize("run,log", [("tp2_to_pp2", "reshard_log"), ("tp2_to_cp2", "cp_log")])
def test_resume_under_another_layout(runs, run, log):
    d = runs["dir"]
    assert "resumed from" in runs[log]
    straight, resharded = losses(str(d / "tp2_straight")), losses(str(d / run))
    assert resharded[:3] == straight[:3]
    for a, b in zip(resharded[3:], straight[3:]):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.dist
def test_context_parallel_training_equals_tp2(runs):
    """The demo at CP 2 x TP 2 (4 processes, packed rows) logs the TP 2 run's losses: six
    optimizer steps within 1e-5 relative."""
    d = runs["dir"]
    straight, cp = losses(str(d / "tp2_straight")), losses(str(d / "cp2_tp2_straight"))
    assert len(cp) == len(straight) == 6
    assert cp == pytest.approx(straight, rel=1e-5)


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_resume_is_bit_identical_pp2(tmp_path):
    pp2 = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"]
    train(2, str(tmp_path / "straight"), *STEPS, *pp2)
    train(2, str(tmp_path / "split"), *STEPS, *pp2, "train.exit_after_steps=3")
    train(2, str(tmp_path / "split"), *STEPS, *pp2)
    assert losses(str(tmp_path / "split")) == losses(str(tmp_path / "straight"))


@pytest.mark.dist
def test_tensorboard_has_every_metric(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = runs["dir"] / "tp2_straight" / "tensorboard"
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("loss", "loss_sft", "loss_mixed_sft", "lambda", "estimate_accuracy",
                 "weight_max", "weight_entropy", "lr", "grad_norm", "loss_scale",
                 "tokens_per_second", "tflops_per_gpu", "peak_memory_gb", "step_time"):
        assert f"train/{name}" in tags, name
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.dist
def test_checkpoints_pruned_and_marked(runs):
    d = runs["dir"] / "tp2_split"
    assert open(d / "latest").read().strip() == "iter_0000006"
    assert os.path.exists(d / "COMPLETED")
    assert sorted(p for p in os.listdir(d) if p.startswith("iter_")) == ["iter_0000003", "iter_0000006"]
