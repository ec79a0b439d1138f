"""The pretrained-model study's plumbing end to end on a tiny random Llama (no SmolLM2 here: the
real study takes most of an hour): HF folder -> import (cached) -> base score -> step-time ratio
-> IFT and SFT runs from the import with its tokenizer and chat template -> evaluation of IFT at
N steps and SFT at N and round(r * N) -> results.json, plots, the generated page block.
Plus the tasks' data and scoring, without a model."""
import json
import os
import shutil

import pytest
import yaml
from _infra import forkserver

from megatron_ift.studies import pretrained, pretrained_report, run_study

ROOT = forkserver.ROOT


def _tiny_llama(path):
    """A random 2-layer Llama with the shipped 384-id tokenizer (ChatML template)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    for name in os.listdir(os.path.join(ROOT, "data", "tokenizer")):
        shutil.copy(os.path.join(ROOT, "data", "tokenizer", name), os.path.join(path, name))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_study")
    hf = root / "tiny_llama"
    _tiny_llama(str(hf))
    with open(run_study.resolve_config("smollm2"), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    # One seed and a set ratio keep it to two training processes (measure_ratio has its own test).
    cfg["study"].update(base_model=str(hf), seeds=[1], compute_ratio=1.5, eval_batch_size=8)
    cfg["study"]["tasks"]["frozen_lake_chat"].update(
        max_new_tokens=6, data={"train_maps": 30, "episodes_per_map": 1, "test_maps": 6})
    cfg["study"]["tasks"]["addition"].update(
        max_new_tokens=6, data={"digits": 2, "train_items": 40, "test_items": 6})
    cfg["train"]["steps"] = 2
    cfg["data"]["seq_length"] = 256
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in forkserver.base_env().items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = root / "out"
    doc = root / "study.md"
    doc.write_text("# Study\n\nhand-written text\n")
    cmd = ["-m", "megatron_ift.studies.run_study", "--pretrained", "--configs",
           str(config), "--work-dir", str(root / "work"), "--out", str(out), "--doc", str(doc),
           "--threads", "1"]
    proc = forkserver.run(cmd, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {"root": root, "out": out, "doc": doc, "log": proc.stdout,
            "results": json.loads((out / "results.json").read_text())}


@pytest.mark.slow
def test_tiny_pretrained_study_runs_every_piece(tiny_study):
    res = tiny_study["results"]
    assert res["compute"]["ratio"] == 1.5 and res["steps"] == 2 and res["sft_steps"] == 3
    assert "model" in res["train_config"] and res["train_config"]["checkpoint"]["pretrained"]
    assert set(res["tasks"]) == {"frozen_lake_chat", "addition"}
    for name, task in res["tasks"].items():
        assert set(task["base"]["metrics"]) == {c["key"] for c in task["columns"]}
        points = {(r["point"], r["seed"], r["step"]) for r in task["runs"]}
        assert points == {("ift", 1, 2), ("sft_steps", 1, 2), ("sft_compute", 1, 3)}
        assert [c["label"] for c in task["summary"]["comparisons"]] == [
            "IFT minus SFT, equal steps", "IFT minus SFT, equal compute"]
    by = {(t["method"], t["seed"]): t for t in res["training"]}
    assert by[("IFT", 1)]["curve"][-1]["lambda"] == pytest.approx(0.2)
    assert by[("SFT", 1)]["curve"][-1]["lambda"] == 0.0 and by[("SFT", 1)]["steps"] == res["sft_steps"]
    # same seed, same data: the first step's SFT loss on the ground truth is the same batch
    assert by[("IFT", 1)]["curve"][0]["loss_sft"] == pytest.approx(by[("SFT", 1)]["curve"][0]["loss_sft"],
                                                                  rel=1e-5)
    for f in res["plots"]:
        assert (tiny_study["out"] / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = tiny_study["doc"].read_text()
    assert "hand-written text" in text and text.count(pretrained_report.BEGIN) == 1
    assert "IFT minus SFT, equal compute" in text and "base model (no fine-tuning)" in text
    # the checkpoints were evaluated, then deleted (1.6 GB each at SmolLM2's size)
    runs = tiny_study["root"] / "work" / "runs"
    assert not list(runs.glob("*/iter_*")) and len(list(runs.glob("*/study_eval_*.json"))) == 3


@pytest.mark.slow
def test_tiny_pretrained_study_replots_and_reuses_the_import(tiny_study, tmp_path):
    doc = tmp_path / "page.md"
    proc = forkserver.run(["-m", "megatron_ift.studies.run_study", "--pretrained", "--replot",
                           "--out", str(tiny_study["out"]), "--doc", str(doc)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pretrained_report.BEGIN in doc.read_text()
    model_root = tiny_study["root"] / "work" / "model"
    logs = []
    again = pretrained.prepare_base_model(str(tiny_study["root"] / "tiny_llama"), str(model_root), logs.append)
    assert os.path.isdir(again) and logs == []  # cached: no second import
    with pytest.raises(ValueError, match="study.base_model"):
        pretrained.prepare_base_model(str(tmp_path), str(model_root), logs.append)
