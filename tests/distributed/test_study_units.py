"""The SFT-versus-IFT study's driver, task scoring, decoding and report (no training)."""
import json
import os

from _infra import forkserver

from megatron_ift.data import demo
from megatron_ift.studies import tasks

ROOT = forkserver.ROOT


def test_task_split_is_disjoint_and_scoring_is_verified(tmp_path):
    path, items = tasks.split(os.path.join(ROOT, "data"), str(tmp_path), num_test=40, seed=3)
    assert len(items) == 40 and {it.task for it in items} == {"add", "reverse"}
    assert sum(it.task == "add" for it in items) == 20
    questions = {it.question for it in items}
    with open(path) as fh:
        train = [json.loads(line)["messages"] for line in fh]
    assert not any(m["content"] in questions for msgs in train for m in msgs if m["role"] == "user")
    assert len(train) + 40 >= demo.NUM_CONVERSATIONS + demo.NUM_PAIRS - 5
    for it in items:
        assert demo.verify_conversation([{"role": "user", "content": it.question},
                                         {"role": "assistant", "content": it.answer}])
    preds = [it.answer if i % 2 == 0 else it.answer + "0" for i, it in enumerate(items)]
    s = tasks.score([" " + p + "\n" for p in preds], items)
    assert s["exact_match"] == 0.5
    assert tasks.score([it.answer for it in items], items)["exact_match_reverse"] == 1.0


def test_greedy_decoding_from_a_checkpoint(tmp_path):
    env = forkserver.base_env()
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    proc = forkserver.run([os.path.join(ROOT, "tests", "_infra", "workers", "study_generate.py"),
                           str(tmp_path)], env=env, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.loads((tmp_path / "ok.json").read_text()) == {"ok": True}
