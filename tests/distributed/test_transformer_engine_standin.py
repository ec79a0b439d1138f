"""The Transformer Engine layer spec, FP8 and THD packing with the real trainer, against the test
suite's TE stand-in (``tests/_infra/te_standin``) under the emulated CUDA device.

Every run starts from one shared checkpoint (a one-step local-spec run) and trains the demo
preset's packed rows with micro-batch 1 (packed rows reach TE's attention as THD sequences):

* the local spec, the reference;
* the TE spec at TP 2 with sequence parallelism, stopped after step 1 and resumed (TE's FusedAdam
  state through a checkpoint and the save after a resume: review finding 3), at PP 2 x VPP 2,
  and at DP 2 with the distributed optimizer and both overlaps: losses, SFT losses, estimator
  accuracy and gradient norms equal the local spec's within 1e-5 relative (float32);
* FP8 with each recipe (delayed scaling with amax histories, current scaling) at TP 2 with
  sequence parallelism: every loss within 2 % of the float32 run's and falling over the run;
* CP 2 x TP 2 with sequence parallelism on unpacked rows (TE's attention with its CP group) against
  the local spec at CP 1 (1e-5);
* CP 2 on packed rows (THD: TE splits every packed segment over the ranks, the packer pads each to
  a multiple of 2 x CP = 4) against the local spec at CP 1 on the same padded rows
  (``data.segment_multiple=4``) (1e-5);
* a local-spec checkpoint resumed on the TE spec, and a TE-spec checkpoint on the local spec;
* ``import-hf`` of a tiny Llama, two steps on the TE spec, ``export-hf``: the export loads in
  ``transformers`` with the logits of the same path on the local spec (1e-5).

What this shows and what it does not: the calls megatron-core makes into TE, our trainer's use
of them and TE's documented contracts (shapes, process groups, int32 ``cu_seqlens`` on the
device, FP8 shape rules, FusedAdam's state) as the stand-in implements them from TE's sources.
Not TE's kernels, NCCL, FP8 numerics on tensor cores or speed: those need a GPU
(``tools/gpu_check.sh``, part ``transformer_engine``).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from _infra import forkserver
from _infra.launch import ROOT, torchrun
from _infra.te import STANDIN, standin_env
from _infra.training import losses, metrics

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(1500)]  # the module fixture: ~14 runs

WORKER = "train_cli.py"
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
COMMON = ["train.micro_batch_size=1", "train.global_batch_size=4", "optimizer.lr_warmup_steps=0",
          "logging.log_interval=1", "train.eval_interval=0", "logging.tensorboard=false",
          "parallel.tensor_model_parallel_size=1"]
TE = ["model.transformer_impl=transformer_engine"]
LOCAL = ["model.transformer_impl=local"]
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
KEYS = ("loss", "loss_sft", "estimate_accuracy", "grad_norm")


def _train(nproc: int, run_dir: str, *overrides: str) -> str:
    return torchrun(WORKER, nproc, "--config", DEMO, f"checkpoint.dir={run_dir}", *COMMON,
                    *overrides, timeout=600, env=standin_env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("te")
    base = str(d / "base")
    _train(1, base, *LOCAL, "train.steps=1")
    start = [f"checkpoint.pretrained={base}", "train.steps=3"]
    out = {"dir": d}
    _train(1, str(d / "local"), *start, *LOCAL)
    _train(2, str(d / "te_tp2sp"), *start, *TE, *TP2_SP, "train.exit_after_steps=1")
    out["te_tp2sp_resume_log"] = _train(2, str(d / "te_tp2sp"), *start, *TE, *TP2_SP)
    _train(2, str(d / "te_pp2vpp2"), *start, *TE, "parallel.pipeline_model_parallel_size=2",
           "parallel.virtual_pipeline_model_parallel_size=2")
    _train(2, str(d / "te_dp2_overlap"), *start, *TE, "parallel.use_distributed_optimizer=true",
           "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true")
    # context parallelism on TE's attention (unpacked rows) vs CP 1
    _train(1, str(d / "local_unpacked"), *start, *LOCAL, "data.packing=false")
    _train(4, str(d / "te_cp2_tp2sp"), *start, *TE, *TP2_SP, "data.packing=false",
           "parallel.context_parallel_size=2")
    # packed rows (THD) with context parallelism on TE vs CP 1 on the same padded rows
    _train(1, str(d / "local_pad4"), *start, *LOCAL, "data.segment_multiple=4")
    out["te_thd_cp2_log"] = _train(2, str(d / "te_thd_cp2"), *start, *TE, "parallel.context_parallel_size=2")
    fp8 = [f"checkpoint.pretrained={base}", "train.steps=4"]
    _train(2, str(d / "fp32_tp2sp"), *fp8, *LOCAL, *TP2_SP)
    for recipe in ("delayed", "tensorwise"):
        _train(2, str(d / f"fp8_{recipe}"), *fp8, *TE, *TP2_SP, "fp8.enabled=true", f"fp8.recipe={recipe}")
    # across the specs: the first step on one, the resume on the other
    for first, then, name in ((LOCAL, TE, "local_to_te"), (TE, LOCAL, "te_to_local")):
        _train(1, str(d / name), *start, *first, "train.exit_after_steps=1")
        out[f"{name}_log"] = _train(1, str(d / name), *start, *then)
    return out


@pytest.mark.parametrize("run", ["te_tp2sp", "te_pp2vpp2", "te_dp2_overlap", "local_to_te", "te_to_local"])
def test_te_spec_equals_the_local_spec(runs, run):
    d = runs["dir"]
    want, got = metrics(str(d / "local")), metrics(str(d / run))
    assert len(got) == len(want) == 3
    for key in KEYS:
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-5), key
    if run in ("te_tp2sp", "local_to_te", "te_to_local"):
        log = runs[f"{run}_resume_log" if run == "te_tp2sp" else f"{run}_log"]
        assert "resumed from" in log and "saved checkpoint at step 3" in log, log[-2000:]


def test_te_context_parallel_equals_the_local_spec_without_it(runs):
    """CP 2 x TP 2 with sequence parallelism on the TE spec (megatron-core's TE attention with its
    CP group, the load-balanced layout) against the local spec at CP 1 on the same rows."""
    d = runs["dir"]
    want, got = metrics(str(d / "local_unpacked")), metrics(str(d / "te_cp2_tp2sp"))
    assert len(got) == len(want) == 3
    for key in KEYS:
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-5), key


def test_te_thd_context_parallel_equals_the_local_spec_without_it(runs):
    """Packed rows (THD) at CP 2 on the TE spec: TE's split of every packed segment (chunks r and
    2cp-1-r of each, the whole row's cu_seqlens), its THD CP attention and RoPE, the step's
    gather of whole rows in that order; against the local spec at CP 1 on the same rows (every
    segment padded to a multiple of 4, which the trainer chose by itself for the TE run)."""
    d = runs["dir"]
    want, got = metrics(str(d / "local_pad4")), metrics(str(d / "te_thd_cp2"))
    assert len(got) == len(want) == 3
    for key in KEYS:
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-5), key
    assert "CP 2" in runs["te_thd_cp2_log"] and "transformer_engine" in runs["te_thd_cp2_log"]
    # the padding changed the rows: the unpadded local run differs
    assert [m["loss"] for m in metrics(str(d / "local"))] != [m["loss"] for m in want]


def test_resuming_thd_rows_at_another_cp_size_names_the_padding(runs):
    """The CP 2 run's rows were padded for TE's THD split; at CP 1 they are not, the data position
    no longer fits, and the refusal (one line, exit 2) says why."""
    d = runs["dir"]
    env = dict(forkserver.base_env(), **standin_env())
    r = forkserver.run(["-m", "megatron_ift.train", "--config", DEMO, f"checkpoint.dir={d / 'te_thd_cp2'}",
                        *COMMON, *TE, f"checkpoint.pretrained={d / 'base'}", "train.steps=4",
                        "checkpoint.override_scheduler=true"], env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "the data no longer matches its saved position" in r.stderr
    assert "padded to a multiple of 2 x parallel.context_parallel_size" in r.stderr, r.stderr


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_trains_close_to_float32(runs, recipe):
    d = runs["dir"]
    ref, got = losses(str(d / "fp32_tp2sp")), losses(str(d / f"fp8_{recipe}"))
    assert len(got) == len(ref) == 4
    assert got == pytest.approx(ref, rel=0.02)  # E4M3 forward / E5M2 gradients, per-tensor scales
    assert got != ref  # the casts happened
    assert got[-1] < got[0]


def test_delayed_scaling_state_is_checkpointed(runs):
    """TE keeps the amax histories and scales in each linear layer's ``_extra_state``; the
    stand-in serialises them the same way, so a resumed FP8 run continues its scales."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_ift.checkpoint.layout import resolve

    meta = FileSystemReader(resolve(str(runs["dir"] / "fp8_delayed"))).read_metadata()
    extra = [k for k in meta.state_dict_metadata if k.endswith("linear_qkv._extra_state") or
             "linear_qkv._extra_state" in k]
    assert extra, sorted(meta.state_dict_metadata)[:20]


def test_import_te_training_export(tmp_path):
    """``import-hf`` -> two IFT steps on the TE spec -> ``export-hf``: ``transformers`` loads the
    export, with the logits of the same path on the local spec."""
    transformers = pytest.importorskip("transformers")
    from megatron_ift.convert import cli as convert_cli

    hf, imported = tmp_path / "hf", tmp_path / "imported"
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(hf)
    for name in os.listdir(os.path.join(ROOT, "data", "tokenizer")):
        shutil.copy(os.path.join(ROOT, "data", "tokenizer", name), hf / name)
    assert convert_cli.main(["import-hf", str(hf), str(imported), "--no-progress"]) == 0
    exports = {}
    for name, impl in (("te", TE), ("local", LOCAL)):
        run = tmp_path / f"run_{name}"
        torchrun(WORKER, 1, "--config", os.path.join(ROOT, "configs", "smollm2_135m_ift.yaml"),
                 f"checkpoint.pretrained={imported}", f"checkpoint.dir={run}",
                 f"data.tokenizer_path={imported}/tokenizer", "data.seq_length=128", "train.steps=2",
                 "train.micro_batch_size=1", "train.global_batch_size=2", "train.eval_interval=0",
                 "optimizer.lr_warmup_steps=0", "logging.tensorboard=false", *impl,
                 timeout=600, env=standin_env())
        exports[name] = tmp_path / f"export_{name}"
        assert convert_cli.main(["export-hf", str(run), str(exports[name]), "--no-progress"]) == 0
    te_losses, local_losses = losses(str(tmp_path / "run_te")), losses(str(tmp_path / "run_local"))
    assert te_losses == pytest.approx(local_losses, rel=1e-5)
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = {k: transformers.AutoModelForCausalLM.from_pretrained(v, dtype=torch.float32)
                  .eval()(tokens).logits for k, v in exports.items()}
        start = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(tokens).logits
    assert (logits["te"] - logits["local"]).abs().max().item() < 1e-4
    assert (logits["te"] - start).abs().max().item() > 1e-3  # the TE run trained the weights


@pytest.mark.parametrize("standin", [True, False], ids=["with_te", "without_te"])
def test_gpu_check_transformer_engine_part(tmp_path, standin):
    """``tools/gpu_check.py --emulate --parts transformer_engine``: with the stand-in importable it
    runs the TE spec (save, resume) and one FP8 step per recipe and names the stand-in; without it
    the part is skipped with the reason, and the check still passes."""
    import json
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if standin:
        env["PYTHONPATH"] = STANDIN
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--emulate",
                           "--parts", "transformer_engine", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    part = json.loads((tmp_path / "gpu_check.json").read_text())["transformer_engine"]
    if not standin:
        assert "not importable" in part["skipped"]
        return
    assert part["ok"] and part["resumed"] and part["transformer_engine"].startswith("stand-in"), part
    assert part["te_vs_local_max_relative_difference"] < 1e-5
    assert all(0 < d < 0.05 for d in part["fp8_first_loss_relative_difference"].values()), part
