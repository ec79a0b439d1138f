"""The trainer's lifecycle: whatever happens inside a step, the entry point's try/finally
releases the run folder's lock, closes the metrics writer and destroys the process groups."""

import json

import pytest
from _infra.launch import torchrun
from _infra.training import DEMO, FAST


@pytest.mark.dist
def test_an_error_inside_a_step_releases_everything(tmp_path):
    run = tmp_path / "run"
    out = torchrun("trainer_raises.py", 2, "--config", DEMO, f"checkpoint.dir={run}", *FAST,
                   "train.steps=4", "checkpoint.save_interval=1")
    seen = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in seen) == [0, 1], out[-2000:]
    for s in seen:
        assert s["raised"] == "injected failure inside step 1"
        assert not s["dist_initialized"] and not s["model_parallel_initialized"]
        assert not s["lock_exists"]
    assert [s["writer_closed"] for s in sorted(seen, key=lambda s: s["rank"])] == [1, 0]  # rank 0 writes
    assert (run / "iter_0000001").is_dir()  # the save before the failure is kept
