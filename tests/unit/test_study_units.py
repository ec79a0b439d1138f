"""The SFT-versus-IFT study's driver, task scoring, decoding and report (no training)."""
import os

import pytest

from megatron_ift.studies import report, run_study


def test_study_configs_load_and_plan():
    study, cfg = run_study.load_study(run_study.resolve_config("frozen_lake"), quick=False)
    assert study["task"] == "frozen_lake" and "quick" not in cfg and "study" not in cfg
    plan = run_study.points_and_seeds(study)
    sft, ift = run_study.Point(0.0, 0.0), run_study.Point(0.2, 0.95)
    assert plan[sft] == plan[ift] == sorted(study["seeds"])
    assert sft.method == "SFT" and ift.method == "IFT" and run_study.Point(0.0, 0.95).method == "IFT"
    assert run_study.Point(0.0, 0.95) in plan and run_study.Point(0.2, 0.0) in plan
    quick, qcfg = run_study.load_study(run_study.resolve_config("frozen_lake"), quick=True)
    assert set(run_study.points_and_seeds(quick)) == {sft, ift}
    assert qcfg["train"]["steps"] < cfg["train"]["steps"]
    assert qcfg["model"] == cfg["model"]  # the merge keeps what quick does not name
    arith, acfg = run_study.load_study(run_study.resolve_config("arithmetic.yaml"), quick=False)
    assert arith["task"] == "arithmetic" and len(arith["seeds"]) >= 3
    # The run configs are valid megatron-ift train configs once the driver fills the paths in.
    from megatron_ift.config_io import from_dict
    from megatron_ift.training.config import RunConfig

    for c in (cfg, qcfg, acfg):
        from_dict(RunConfig, run_study.deep_merge(c, {"data": {"paths": ["x.jsonl"],
                                                               "tokenizer_path": "tok"}}))


def test_child_env_is_a_fresh_world():
    env = run_study.child_env(2)
    assert "MASTER_PORT" not in env and env["OMP_NUM_THREADS"] == "2"


def test_published_train_config_has_no_checkout_paths():
    root = os.path.join(os.sep, "some", "checkout")
    cfg = {"data": {"paths": [os.path.join(root, "runs", "a.jsonl"), "/elsewhere/b.jsonl"],
                    "tokenizer_path": os.path.join(root, "data", "tokenizer"), "seq_length": 128},
           "checkpoint": {"dir": root + "_other/x"}}
    out = run_study.portable_paths(cfg, root)
    assert out == {"data": {"paths": [os.path.join("runs", "a.jsonl"), "/elsewhere/b.jsonl"],
                            "tokenizer_path": os.path.join("data", "tokenizer"), "seq_length": 128},
                   "checkpoint": {"dir": root + "_other/x"}}  # a sibling folder is not inside
    assert cfg["data"]["tokenizer_path"].startswith(root)  # the input is left alone


def _fake_results():
    runs = []
    for key, lam, gamma, base in (("l0_g0", 0.0, 0.0, 0.5), ("l0.2_g0.95", 0.2, 0.95, 0.6),
                                  ("l0.1_g0.95", 0.1, 0.95, 0.55), ("l0.2_g0", 0.2, 0.0, 0.52),
                                  ("l0.2_g0.5", 0.2, 0.5, 0.58)):
        for seed in (1, 2):
            ev = {split: {"success_rate": base + 0.01 * seed, "mean_return": base - 0.05,
                          "mean_steps": 6.0, "invalid_rate": 0.0, "episodes": 10}
                  for split in ("seen", "unseen")}
            curve = [{"step": s, "loss_sft": 1.0 / s, "loss": 1.0 / s} for s in (1, 5, 10)]
            runs.append({"point": key, "method": "SFT" if key == "l0_g0" else "IFT", "lambda": lam,
                         "gamma": gamma, "seed": seed, "eval": ev, "curve": curve})
    summary = run_study.summarise(runs, run_study.FrozenLakeTask.headline)
    base = {s: {"success_rate": 0.05, "mean_return": 0.04} for s in ("seen", "unseen")}
    task = {"study": {"ift": {"max_lambda": 0.2, "gamma": 0.95}}, "runs": runs, "summary": summary,
            "baselines": {"random": base}, "steps": 10, "wall_s": 60.0}
    return {"tasks": {"frozen_lake": task}, "started": "now", "command": "cmd", "wall_s": 120.0,
            "machine": {"cpu_count": 2, "torch": "x", "threads": 2}}


def test_summary_pairs_seeds_and_report_writes_plots_and_doc(tmp_path):
    results = _fake_results()
    p = results["tasks"]["frozen_lake"]["summary"]["l0.2_g0.95"]
    assert p["metrics"]["unseen_success_rate"]["mean"] == pytest.approx(0.615)
    assert p["minus_sft"]["unseen_success_rate"]["mean"] == pytest.approx(0.1)
    assert p["wins_vs_sft"]["unseen_success_rate"] == 2
    files = report.plots(results, str(tmp_path))
    assert set(files) == {"frozen_lake_curves.png", "frozen_lake_vs_lambda.png",
                          "frozen_lake_vs_gamma.png"}
    for f in files:
        with open(tmp_path / f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    results["plots"] = files
    doc = tmp_path / "study.md"
    doc.write_text("# Study\n\nhand-written conclusions\n")
    report.update_doc(str(doc), results, "study")
    report.update_doc(str(doc), results, "study")  # idempotent: one block, text kept
    text = doc.read_text()
    assert text.count(report.BEGIN) == 1 and "hand-written conclusions" in text
    assert "| IFT lambda=0.2 gamma=0.95 | 2 | 61.5 ± 0.7" in text
    assert "+10.0 ± 0.0 (2/2)" in text and "![frozen_lake_curves.png](study/frozen_lake_curves.png)" in text


def test_a_named_pretrained_study_gets_its_own_block_on_the_page(tmp_path):
    from megatron_ift.studies import pretrained_report
    from megatron_ift.studies.report import write_block

    main = pretrained_report.markers({"study": {"base_model": "smollm2"}})
    variant = pretrained_report.markers({"study": {"name": "optimal_demos"}})
    assert main == (pretrained_report.BEGIN, pretrained_report.END)
    assert "study-pretrained-optimal_demos:begin" in variant[0] and variant[1].endswith(":end -->")
    doc = str(tmp_path / "page.md")
    for (begin, end), body in ((main, "first"), (variant, "variant"), (main, "second")):
        write_block(doc, f"{begin}\n{body}\n{end}", begin, end)
    text = open(doc).read()
    assert "variant" in text and "second" in text and "first" not in text
    assert text.count(main[0]) == 1 and text.count(variant[0]) == 1
    # the shipped variant config names itself and trains on optimal demonstrations only
    study, _ = run_study.load_study(run_study.resolve_config("smollm2_optimal"), quick=False)
    assert study["name"] == "optimal_demos" and study["compute_ratio"] == 1.37
    assert [t["data"]["epsilon"] for t in study["tasks"].values()] == [0.0]
