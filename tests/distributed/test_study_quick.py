"""The quick SFT-versus-IFT study end to end: real ``megatron-ift train`` runs on Frozen Lake
demonstrations, greedy rollouts, results and plots. Both methods must learn (success well above
a random policy's, measured on the same lakes in the same run); which one wins is not asserted."""

import json

import pytest
from _infra import forkserver


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2-3 min on an idle 2-core CPU; generous for a shared one
def test_quick_study_sft_and_ift_both_learn(tmp_path):
    env = {k: v for k, v in forkserver.base_env().items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = tmp_path / "out"
    cmd = ["-m", "megatron_ift.studies.run_study", "--quick",
           "--work-dir", str(tmp_path / "work"), "--out", str(out), "--doc", "none", "--jobs", "2", "--threads", "1"]
    proc = forkserver.run(cmd, env=env, timeout=1700)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    results = json.loads((out / "results.json").read_text())
    fl = results["tasks"]["frozen_lake"]
    random_rate = fl["baselines"]["random"]["unseen"]["success_rate"]
    assert fl["baselines"]["optimal"]["unseen"]["success_rate"] == 1.0
    assert random_rate < 0.2
    by_method = {}
    for run in fl["runs"]:
        by_method[run["method"]] = run
        assert run["curve"][-1]["step"] == fl["steps"]
        assert run["curve"][-1]["loss_sft"] < 0.6 * run["curve"][0]["loss_sft"]
    assert set(by_method) == {"SFT", "IFT"}
    assert by_method["SFT"]["lambda"] == 0.0 and by_method["SFT"]["gamma"] == 0.0
    assert by_method["IFT"]["curve"][-1]["lambda"] == pytest.approx(0.2)
    for method, run in by_method.items():
        for split in ("seen", "unseen"):
            rate = run["eval"][split]["success_rate"]
            assert rate >= max(2.5 * random_rate, random_rate + 0.15), (method, split, rate, random_rate)
    for f in ("frozen_lake_curves.png",):
        assert (out / f).stat().st_size > 1000
