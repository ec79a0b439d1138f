"""The README's main job: the demo preset's IFT loss falls in its first 100 steps (CPU, TP 2)."""

import json

import pytest

from dist_utils import torchrun
from train_utils import DEMO


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_preset_loss_falls(tmp_path):
    out = torchrun("train_cli.py", 2, "--config", DEMO, f"checkpoint.dir={tmp_path}", timeout=900)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 100
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    # Measured: ~5.4 -> ~2.3 (ratio ~0.43). Stated margin: the last ten steps' mean IFT loss is
    # at most 60% of the first ten's, and the model predicts answer tokens far above chance.
    assert last <= 0.6 * first, (first, last)
    assert rows[-1]["estimate_accuracy"] > 0.2
    assert "eval step 100" in out
    assert (tmp_path / "COMPLETED").exists()
