"""Config validation: every bad value fails at construction, naming the key and the fix."""
import pytest

from megatron_ift.config_io import apply_overrides, from_dict, load_yaml
from megatron_ift.ift import IFTConfig, lambda_at
from megatron_ift.parallel import ParallelConfig
from megatron_ift.training.config import RunConfig, load_run_config
from megatron_ift.validation import ConfigError


@pytest.mark.parametrize("kwargs,needle", [
    (dict(estimator="beam"), "ift.estimator='beam'"),
    (dict(estimator="top_p"), "needs ift.top_p"),
    (dict(estimator="top_p", top_p=1.5), "ift.top_p=1.5"),
    (dict(top_p=0.9), "only used by estimator='top_p'"),
    (dict(gamma=1.5), "ift.gamma=1.5"),
    (dict(max_lambda=-0.1), "ift.max_lambda=-0.1"),
    (dict(schedule="linear"), "warmup_steps >= 1"),
    (dict(k=0), "ift.k=0"),
    (dict(temperature=0.0), "ift.temperature=0.0"),
    (dict(propagation_norm="L3"), "ift.propagation_norm='L3'"),
    (dict(detach_weights="yes"), "ift.detach_weights='yes'"),
])
def test_bad_ift_config(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        IFTConfig(**kwargs)


def test_lambda_schedule():
    assert lambda_at(IFTConfig(), 0) == 0.2
    lin = IFTConfig(schedule="linear", min_lambda=0.0, max_lambda=0.4, warmup_steps=4)
    assert [lambda_at(lin, s) for s in (0, 1, 2, 4, 10)] == pytest.approx([0, 0.1, 0.2, 0.4, 0.4])
    noisy = IFTConfig(disturb="normal", disturb_std=0.5, seed=7)
    values = [lambda_at(noisy, s) for s in range(200)]
    assert values == [lambda_at(noisy, s) for s in range(200)]  # a pure function of the step
    assert len(set(values)) > 150 and all(0.0 <= v <= 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.2) < 0.03
    assert lambda_at(IFTConfig(max_lambda=0.0, gamma=0.0), 5) == 0.0


@pytest.mark.parametrize("kwargs,world,needle", [
    (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6, "world size 6 is not divisible"),
])
def test_world_not_divisible(kwargs, world, needle):
    with pytest.raises(ConfigError, match=needle):
        ParallelConfig(**kwargs).data_parallel_size(world)


def test_mis_sized_layouts():
    with pytest.raises(ConfigError, match="virtual_pipeline_model_parallel_size needs"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match="sequence_parallel=true needs"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match="cannot be split into"):
        ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2).check_model(6, 4, 4)
    with pytest.raises(ConfigError, match="must divide the attention heads"):
        ParallelConfig(tensor_model_parallel_size=4).check_model(4, 4, 2)


def test_interleaved_pipeline_needs_microbatches_multiple_of_pp():
    cfg = load_run_config("configs/demo.yaml", [
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
        "train.global_batch_size=12", "train.micro_batch_size=4",
    ])
    with pytest.raises(ConfigError, match="multiple of pipeline_model_parallel_size=2"):
        cfg.check_world(2)


def test_demo_config_loads_and_overrides_apply():
    cfg = load_run_config("configs/demo.yaml", ["ift.gamma=0.5", "train.steps=17"])
    assert isinstance(cfg, RunConfig) and cfg.ift.gamma == 0.5 and cfg.train.steps == 17
    assert cfg.check_world(2) == 1 and cfg.train.num_microbatches(1) == 4


@pytest.mark.parametrize("override,needle", [
    ("model.hidden=3", "unknown key 'model.hidden'"),
    ("extra.key=1", "unknown key 'extra'"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0 must be a positive integer"),
    ("model.params_dtype=fp8", "model.params_dtype='fp8'"),
    ("data.seq_length=4096", "exceeds model.max_position_embeddings"),
    ("optimizer.lr_warmup_steps=500", "warm-up (500 steps) must be shorter"),
    ("parallel.context_parallel_size=3", "cannot be split for parallel.context_parallel_size=3"),
    ("parallel.context_parallel_size=2 model.attention_backend=local", "needs model.attention_backend=sdpa"),
    ("parallel.context_parallel_size=2 model.attention_dropout=0.1", "would draw the same attention-dropout masks"),
    ("parallel.context_parallel_size=2 parallel.tensor_model_parallel_size=4 model.num_query_groups=4 "
     "parallel.sequence_parallel=true data.seq_length=36",
     "18 tokens per rank is not a multiple of tensor_model_parallel_size=4"),
    ("train.steps=ten", "train.steps='ten' must be an integer"),
    ("ift.estimator=top_p", "needs ift.top_p"),
    ("parallel.tensor_model_parallel_size=3", "must divide the attention heads"),
    ("train.global_batch_size=10", "train.global_batch_size=10 is not a multiple"),
    ("fp8.recipe=mxfp9", "fp8.recipe='mxfp9'"),
    # TE's FP8 GEMMs need tokens in multiples of 8: 116 x 4 / 2 (CP) = 232 passes, / 2 (SP) = 116 fails
    ("fp8.enabled=true data.seq_length=116 parallel.context_parallel_size=2 parallel.sequence_parallel=true",
     "= 116 tokens, and Transformer Engine's FP8 GEMMs need a multiple of 8"),
    ("fp8.enabled=true data.seq_length=126 train.micro_batch_size=1 train.global_batch_size=4",
     "data.seq_length=126 x train.micro_batch_size=1 = 126 tokens"),
])
def test_bad_run_config(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_run_config("configs/demo.yaml", override.split())


def test_transformer_engine_refused_without_gpu():
    from megatron_ift.platform import Platform
    from megatron_ift.training.preflight import check_platform

    cfg = load_run_config("configs/demo.yaml", ["model.transformer_impl=transformer_engine"])
    with pytest.raises(ConfigError, match="needs a CUDA GPU and the transformer-engine"):
        check_platform(cfg, Platform())


def test_override_syntax():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["train.steps"])
    assert apply_overrides({}, ["a.b=[1, 2]", "a.c=true"]) == {"a": {"b": [1, 2], "c": True}}


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/llama3_8b_ift.yaml", "configs/llama3_8b_ift_32k.yaml",
                                  "configs/llama3_70b_ift.yaml", "configs/pretrain_continuation.yaml"])
def test_presets_are_valid(path):
    data = load_yaml(path)
    cfg = from_dict(RunConfig, data)
    assert cfg.model.num_layers % (cfg.parallel.pipeline_model_parallel_size * cfg.parallel.vpp) == 0


def test_model_config_has_one_from_dict_path(tmp_path):
    """A model: section and a checkpoint's recorded model go through ModelConfig.from_dict:
    an unknown key (say, recorded by a newer version) is refused by name, never dropped."""
    import dataclasses
    import json

    from megatron_ift.config_io import to_dict
    from megatron_ift.models.config import ModelConfig

    demo = load_run_config("configs/demo.yaml")
    recorded = dict(to_dict(demo.model), future_key=1)
    with pytest.raises(ConfigError, match=r"^somewhere: unknown key 'model.future_key' in model"):
        ModelConfig.from_dict(recorded, source="somewhere")
    assert ModelConfig.from_dict(to_dict(demo.model)) == demo.model
    ckpt = tmp_path / "imported"
    ckpt.mkdir()
    (ckpt / "megatron_ift.json").write_text(json.dumps({"model": recorded}))
    with pytest.raises(ConfigError, match="unknown key 'model.future_key'") as info:
        load_run_config("configs/demo.yaml", [f"checkpoint.pretrained={ckpt}", "model=null"])
    assert str(ckpt) in str(info.value) and "\n" not in str(info.value)
    from megatron_ift.inference.loading import model_config_of  # generate's path

    with pytest.raises(ConfigError, match="unknown key 'model.future_key'"):
        model_config_of(str(ckpt), recorded)
    # Literal-typed choices are checked from a mapping and at construction alike
    with pytest.raises(ConfigError, match="model.activation='relu' is not one of 'swiglu', 'gelu'"):
        ModelConfig.from_dict(dict(to_dict(demo.model), activation="relu"))
    with pytest.raises(ConfigError, match="train.recompute='some' is not one of"):
        dataclasses.replace(demo.train, recompute="some")


@pytest.mark.parametrize("path", ["configs/llama3_8b_ift.yaml", "configs/llama3_8b_ift_32k.yaml",
                                  "configs/llama3_70b_ift.yaml", "configs/gpu_check_1b.yaml"])
def test_gpu_presets_satisfy_fp8_shape_rules(path):
    """The shipped GPU presets can turn FP8 on: their per-rank tokens are multiples of 8 and their
    widths multiples of 16 (the refusal above is for configurations TE would reject at the first
    forward)."""
    cfg = load_run_config(path, ["fp8.enabled=true"])
    assert cfg.fp8.enabled
