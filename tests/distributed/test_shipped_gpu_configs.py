"""The shipped GPU configurations, run as shipped under the emulated CUDA device.

Every GPU preset (``configs/llama3_8b_ift.yaml``, ``configs/llama3_70b_ift.yaml``,
``configs/llama3_8b_ift_32k.yaml``, ``configs/gpu_check_1b.yaml``) trains with its model shrunk in width and depth, its layout scaled to
a 4-process world (the parallel features kept: pipeline with virtual stages, tensor parallelism
with sequence parallelism, data parallelism with the distributed optimizer), and every other key
as shipped: packing, micro-batch, both overlap options, the fusions the platform decides. Each
run is 1 step + save, then a resume for step 2 + save. The 8B, 70B and 32k presets (``transformer_impl:
auto``) run with the test suite's Transformer Engine stand-in importable (tests/_infra/te_standin),
as in a GPU container with TE: the TE layer spec, packed rows as THD, TE's FusedAdam, the fusions
decided with TE present and apex absent; ``gpu_check_1b`` is the local spec as shipped. The saved weights and the losses equal the
same run with both overlap options off: with ``overlap_param_gather`` the weights of the other
data-parallel shards are gathered at the next forward, so a save right after an optimizer step
(``exit_after_steps``, preemption, the end of the run) must gather them first.
"""

import json
import os

import pytest
import torch
from _infra.launch import ROOT, torchrun
from _infra.te import standin_env

pytestmark = [pytest.mark.slow]

SHRINK = [
    "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "model.vocab_size=384", "model.max_position_embeddings=256",
    "data.tokenizer_path=data/tokenizer", "data.seq_length=128", "data.num_proc=1",
    "train.global_batch_size=8", "train.steps=2", "train.eval_interval=0",
    "optimizer.lr=1e-3", "optimizer.lr_warmup_fraction=0", "optimizer.lr_warmup_steps=0",
    "checkpoint.pretrained=null", "logging.log_interval=1",
]
# (preset, its layout scaled to 4 processes, layers divisible by PP x VPP, with the TE stand-in)
PRESETS = {
    "llama3_8b": ("llama3_8b_ift.yaml", ["model.num_layers=8"], 4, True),  # PP2 x VPP4 as shipped, DP2
    "llama3_70b": ("llama3_70b_ift.yaml", ["model.num_layers=4", "parallel.tensor_model_parallel_size=2",
                                           "parallel.pipeline_model_parallel_size=1"], 4, True),  # TP2+SP, DP2
    "gpu_check_1b": ("gpu_check_1b.yaml", ["model.num_layers=2"], 2, False),  # one GPU as shipped -> DP2
    # TP2+SP x CP4 as shipped -> TP2+SP x CP2: packed THD rows split per segment over the CP ranks
    "llama3_8b_32k": ("llama3_8b_ift_32k.yaml", ["model.num_layers=2",
                                                 "parallel.context_parallel_size=2"], 4, True),
}
NO_OVERLAP = ["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]


def _env(te: bool) -> dict:
    return standin_env() if te else {"MEGATRON_IFT_EMULATE_CUDA": "1"}


def _run(preset: str, run_dir: str, *extra: str) -> None:
    config, layout, nproc, te = PRESETS[preset]
    args = ["--config", os.path.join(ROOT, "configs", config), f"checkpoint.dir={run_dir}",
            *SHRINK, *layout, *extra]
    torchrun("train_cli.py", nproc, *args, "train.exit_after_steps=1", env=_env(te), timeout=600)
    out = torchrun("train_cli.py", nproc, *args, env=_env(te), timeout=600)
    assert "resumed from" in out and "done: 2 steps" in out, out[-3000:]
    spec = "transformer_engine layer spec" if te else "local layer spec"
    assert spec in out, out[:3000]  # the start line names the layer spec that ran


def _weights(ckpt: str) -> dict[str, torch.Tensor]:
    from megatron_ift.convert.streaming import (
        DistCheckpointReader,
        single_process_group,
    )

    with single_process_group():
        reader = DistCheckpointReader(ckpt)
        return {k: reader.read(k) for k in reader.tensors()}  # model, optimizer state, fp32 masters


def _losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.dist
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_shipped_gpu_config_runs_and_overlap_changes_nothing(preset, tmp_path):
    shipped, plain = str(tmp_path / "shipped"), str(tmp_path / "no_overlap")
    _run(preset, shipped)
    overlapping = "overlap_param_gather: true" in open(
        os.path.join(ROOT, "configs", PRESETS[preset][0]), encoding="utf-8").read()
    if not overlapping:
        return  # shipped without the overlap options: it ran, saved and resumed under emulation
    _run(preset, plain, *NO_OVERLAP)
    assert _losses(shipped) == pytest.approx(_losses(plain), rel=1e-6)
    for step in (1, 2):
        a = _weights(os.path.join(shipped, f"iter_{step:07d}"))
        b = _weights(os.path.join(plain, f"iter_{step:07d}"))
        assert a.keys() == b.keys() and len(a) > 5
        for key in a:
            assert torch.equal(a[key], b[key]), f"step {step}: {key} differs from the run without overlap"
