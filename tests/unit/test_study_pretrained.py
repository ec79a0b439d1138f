"""The pretrained-model study's plumbing end to end on a tiny random Llama (no SmolLM2 here: the
real study takes most of an hour): HF folder -> import (cached) -> base score -> step-time ratio
-> IFT and SFT runs from the import with its tokenizer and chat template -> evaluation of IFT at
N steps and SFT at N and round(r * N) -> results.json, plots, the generated page block.
Plus the tasks' data and scoring, without a model."""
import json
import os

import pytest

from megatron_ift.studies import chat_tasks as ct
from megatron_ift.studies import frozen_lake as fl
from megatron_ift.studies import pretrained


def test_lake_plans_are_parsed_and_played():
    desc = ("SFFF", "FHFH", "FFFH", "HFFG")  # Gymnasium's 4x4 map
    best = "down, down, right, down, right, right"
    assert ct.parse_moves(best) == [1, 1, 2, 1, 2, 2]
    assert ct.parse_moves("Move Down, then RIGHT.") == [1, 2]
    assert ct.parse_moves("S F F F") == []
    s = ct.score_plans([best, "right, down", "no idea", best + ", up, up"], [desc] * 4, max_steps=24)
    # the second falls into the hole at (1, 1); the fourth stops at the goal (extra moves unused)
    assert s == {"success_rate": 0.5, "mean_return": pytest.approx(2 * 0.99 ** 5 / 4), "invalid_rate": 0.25,
                 "mean_steps": pytest.approx((6 + 2 + 0 + 6) / 4)}
    assert ct.play_plan(desc, [2] * 30, max_steps=5).steps == 5  # the cap holds


def test_lake_chat_data_hold_out_lakes_and_demonstrations_succeed(tmp_path):
    cfg = ct.LakeChatConfig(train_maps=20, episodes_per_map=2, epsilon=0.2, test_maps=10, seed=3)
    facts, test = ct.lake_chat_data(cfg, str(tmp_path / "lake.jsonl"))
    rows = [json.loads(line)["messages"] for line in open(tmp_path / "lake.jsonl")]
    assert facts["demonstrations"] == len(rows) > 20 and facts["test_maps"] == len(test) == 10
    train_questions = {r[0]["content"] for r in rows}
    assert not train_questions & {ct.lake_question(d) for d in test}
    for r in rows:  # every demonstration reaches the goal when its answer is played
        desc = tuple(r[0]["content"].split("\n")[1:5])
        desc = tuple(row.replace(" ", "") for row in desc)
        assert ct.play_plan(desc, ct.parse_moves(r[1]["content"]), 24).success
    for plan, desc in zip(ct.optimal_plans(test), test):  # shortest plans: optimal and successful
        assert ct.play_plan(desc, plan, 24).success
        assert len(plan) == fl.shortest_distances(fl.FrozenLake(desc))[0]
    with pytest.raises(ValueError, match="study.data.epsilon"):
        ct.LakeChatConfig(epsilon=1.5)


def test_addition_worked_answers_and_scoring(tmp_path):
    assert ct.worked_addition(58, 67) == ("8 + 7 = 15, write 5, carry 1. 5 + 6 + 1 = 12, write 2, "
                                          "carry 1. Write the carry 1. So 58 + 67 = 125.")
    for a, b in ((12, 34), (99, 1), (4821, 3967)):
        assert ct.last_number(ct.worked_addition(a, b)) == a + b
    assert ct.last_number("The sum is 1,234.") == 1234 and ct.last_number("none") is None
    facts, test = ct.addition_data(ct.AdditionConfig(digits=2, train_items=50, test_items=10),
                                   str(tmp_path / "add.jsonl"))
    rows = [json.loads(line)["messages"] for line in open(tmp_path / "add.jsonl")]
    assert len(rows) == 50 and len(test) == 10
    assert not {r[0]["content"] for r in rows} & {ct.addition_question(a, b) for a, b in test}
    replies = [f"So it is {a + b}." if i % 2 else "no idea" for i, (a, b) in enumerate(test)]
    assert ct.score_additions(replies, test) == {"exact_match": 0.5, "no_number_rate": 0.5}


def test_step_time_ratio_is_the_ratio_of_medians_without_the_first_step(tmp_path):
    started = []

    def fake_train_run(base_cfg, run_dir, point, seed, threads, extra):
        started.append((point.method, extra))
        os.makedirs(os.path.join(run_dir, "iter_0000003"))
        first, rest = (60.0, [2.0, 2.2, 1.8]) if point.method == "SFT" else (90.0, [2.6, 2.8, 3.0])
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
            for i, t in enumerate([first, *rest], 1):
                fh.write(json.dumps({"step": i, "step_time": t}) + "\n")
        return 1.0

    out = pretrained.measure_ratio("cfg.yaml", str(tmp_path), {"max_lambda": 0.2, "gamma": 0.95},
                                   4, 2, fake_train_run, lambda msg: None)
    assert out == {"sft_step_s": 2.0, "ift_step_s": 2.8, "ratio": pytest.approx(1.4), "timed_steps": 3}
    assert [m for m, _ in started] == ["SFT", "IFT"] and "train.steps=4" in started[0][1]
    assert not list(tmp_path.glob("calibration/*/iter_*"))  # checkpoints freed


def test_paired_summary_counts_direction():
    runs = []
    for seed, (ift, sft_n, sft_c) in enumerate(((0.5, 0.4, 0.6), (0.3, 0.2, 0.1), (0.2, 0.3, 0.3)), 1):
        for key, v in (("ift", ift), ("sft_steps", sft_n), ("sft_compute", sft_c)):
            runs.append({"point": key, "seed": seed,
                         "metrics": {"exact_match": v, "no_number_rate": 0.0, "heldout_nll": 1.0 - v}})
    base = {"exact_match": 0.1, "no_number_rate": 0.5, "heldout_nll": 2.0}
    s = pretrained.summarise(runs, base, "addition")
    steps, compute = s["comparisons"]
    assert steps["label"].endswith("equal steps") and compute["label"].endswith("equal compute")
    assert steps["diff"]["exact_match"]["mean"] == pytest.approx(0.1 / 3)
    assert steps["ahead"]["exact_match"] == 2 and steps["ahead"]["heldout_nll"] == 2  # lower is better
    assert compute["ahead"]["exact_match"] == 1 and s["points"]["ift"]["metrics"]["exact_match"]["n"] == 3
