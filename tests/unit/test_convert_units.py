"""Conversion pieces without megatron models: the name/shape map, the layout transforms, the
config mapping, safetensors streaming I/O and every refusal (single process, seconds)."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ift.convert import ConversionError, cli
from megatron_ift.convert.arch import LLAMA, QWEN2, get_architecture
from megatron_ift.convert.export_hf import export_hf, parse_size
from megatron_ift.convert.hf_config import hf_config_from_model, model_config_from_hf
from megatron_ift.convert.import_hf import import_hf
from megatron_ift.convert.safetensors_io import (
    SafetensorsWriter,
    read_header,
    read_tensor,
)

LLAMA_HF = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 50, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _config(**changes):
    hf = copy.deepcopy(LLAMA_HF)
    for k, v in changes.items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    return hf


def write_fake_hf(path, hf_config, *, per_shard=4, drop=(), extra=(), reshape=None):
    """An HF folder with random weights laid out as ``hf_config`` says (sharded + index)."""
    cfg, arch = model_config_from_hf(hf_config)
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g) for n, s in arch.expected_hf(cfg).items()
               if n not in drop}
    for name in extra:
        tensors[name] = torch.zeros(3)
    for name, shape in (reshape or {}).items():
        tensors[name] = torch.zeros(shape)
    os.makedirs(path)
    names = list(tensors)
    weight_map = {}
    for k in range(0, len(names), per_shard):
        fname = f"model-{k // per_shard + 1:05d}.safetensors"
        save_file({n: tensors[n] for n in names[k:k + per_shard]}, os.path.join(path, fname))
        weight_map.update({n: fname for n in names[k:k + per_shard]})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f)
    return tensors


def test_qkv_fusion_is_megatrons_per_group_layout():
    hf = _config(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    cfg, arch = model_config_from_hf(hf)
    (qkv,) = [t for t in arch.tensors if t.megatron.endswith("linear_qkv.weight")]
    head, groups, per_group = 8, 2, 3
    q, k, v = (torch.randn(s) for s in qkv.hf_shapes(cfg))
    fused = qkv.to_megatron([q, k, v], cfg)
    assert fused.shape == ((6 + 2 * 2) * head, 48)
    # megatron-core's split (attention.py): view [ng, (np/ng + 2) * hn, h], then [q, k, v].
    view = fused.view(groups, (per_group + 2) * head, 48)
    mq, mk, mv = torch.split(view, [per_group * head, head, head], dim=1)
    assert torch.equal(mq.reshape(-1, 48), q)  # query heads keep their order
    assert torch.equal(mk.reshape(-1, 48), k) and torch.equal(mv.reshape(-1, 48), v)
    assert all(torch.equal(a, b) for a, b in zip(qkv.to_hf(fused, cfg), (q, k, v)))


def test_qkv_bias_gate_up_and_vocab_round_trip():
    qwen2 = _config(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    cfg, arch = model_config_from_hf(qwen2)
    assert cfg.add_qkv_bias and arch is QWEN2
    by_key = {t.megatron.removeprefix("decoder.layers."): t for t in arch.active(cfg)}
    for key in ("self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
                "embedding.word_embeddings.weight"):
        tmap = by_key[key]
        parts = [torch.randn(s) for s in tmap.hf_shapes(cfg)]
        fused = tmap.to_megatron(parts, cfg)
        assert fused.shape == tmap.megatron_shape(cfg)
        back = tmap.to_hf(fused, cfg)
        assert all(torch.equal(a, b) for a, b in zip(back, parts)), key
    fc1 = by_key["mlp.linear_fc1.weight"]
    gate, up = (torch.randn(s) for s in fc1.hf_shapes(cfg))
    assert torch.equal(fc1.to_megatron([gate, up], cfg), torch.cat([gate, up]))  # [gate; up]
    emb = by_key["embedding.word_embeddings.weight"]
    padded = emb.to_megatron([torch.randn(50, 32)], cfg)
    assert padded.shape == (128, 32) and torch.count_nonzero(padded[50:]) == 0


def test_expected_tensors_follow_the_config():
    cfg, arch = model_config_from_hf(LLAMA_HF)
    names = list(arch.expected_hf(cfg))
    assert len(names) == 2 * 9 + 3
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert names[1].startswith("model.layers.0.") and names[-3].startswith("model.layers.1.")
    tied, _ = model_config_from_hf(_config(tie_word_embeddings=True))
    assert "lm_head.weight" not in arch.expected_hf(tied)
    assert arch.tolerated_hf(tied, "lm_head.weight") and not arch.tolerated_hf(cfg, "foo")
    assert arch.tolerated_hf(cfg, "model.layers.3.self_attn.rotary_emb.inv_freq")


def test_llama3_config_round_trip_in_both_styles():
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    legacy = _config(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072,
                     torch_dtype="bfloat16", num_key_value_heads=1, head_dim=12)
    cfg, arch = model_config_from_hf(legacy, make_vocab_size_divisible_by=64)
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rotary_base) == (True, 32.0, 500000.0)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.params_dtype) == (1, 12, "bfloat16")
    assert cfg.padded_vocab_size(1) == 64 and cfg.padded_vocab_size(2) == 128
    written = hf_config_from_model(cfg, arch, dtype="bfloat16", base=legacy)
    assert written["rope_scaling"] == scaling and written["rope_theta"] == 500000.0
    assert model_config_from_hf(written, make_vocab_size_divisible_by=64)[0] == cfg

    modern = _config(rope_theta=None, rope_parameters={"rope_theta": 500000.0, **scaling},
                     torch_dtype=None, dtype="bfloat16", max_position_embeddings=131072,
                     num_key_value_heads=1, head_dim=12)
    assert model_config_from_hf(modern, make_vocab_size_divisible_by=64)[0] == cfg
    written = hf_config_from_model(cfg, arch, dtype="float32", base=modern)
    assert written["rope_parameters"] == {"rope_theta": 500000.0, **scaling}
    assert written["dtype"] == "float32" and "rope_scaling" not in written
    # No base: the classic style, which transformers 4 and 5 both read.
    fresh = hf_config_from_model(cfg, arch, dtype="bfloat16")
    assert fresh["architectures"] == ["LlamaForCausalLM"] and fresh["torch_dtype"] == "bfloat16"
    assert model_config_from_hf(fresh, make_vocab_size_divisible_by=64)[0] == cfg


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "architecture 'gpt2' is not supported"),
    (dict(architectures=["LlamaForSequenceClassification"]), "is not the causal LM"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling type 'linear'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     "megatron-core hard-codes"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}),
     "original_max_position_embeddings"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias/mlp_bias"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64),
     "--max-position-embeddings 64"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
          sliding_window=32), "sliding_window=32"),
    (dict(num_hidden_layers=None), "lacks ['num_hidden_layers']"),
    (dict(num_key_value_heads=3), "not divisible"),
])
def test_unsupported_configs_are_refused(changes, message):
    with pytest.raises(ConversionError) as err:
        model_config_from_hf(_config(**changes))
    assert message in str(err.value)


def test_sliding_window_at_or_beyond_the_context_is_accepted():
    mistral = _config(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64)
    cfg, arch = model_config_from_hf(mistral, max_position_embeddings=64)
    assert arch.name == "mistral" and cfg.max_position_embeddings == 64
    qwen = _config(model_type="qwen2", architectures=["Qwen2ForCausalLM"], sliding_window=32,
                   use_sliding_window=False)
    assert model_config_from_hf(qwen)[0].max_position_embeddings == 128


def test_export_config_refuses_what_hf_cannot_express():
    cfg, _ = model_config_from_hf(LLAMA_HF)
    with pytest.raises(ConversionError, match="use --arch llama"):
        hf_config_from_model(cfg, QWEN2, dtype="float32")
    assert get_architecture("qwen2") is QWEN2 and get_architecture("llama") is LLAMA


def test_streaming_writer_and_reader_match_the_safetensors_library(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7), "c": torch.randn(2, 2, 3)}
    path = str(tmp_path / "x.safetensors")
    writer = SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for name in ("c", "a", "b"):  # any order: the header fixed every place up front
        writer.write(name, tensors[name])
    writer.close()
    loaded = load_file(path)
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in tensors.items())
    save_file(tensors, str(tmp_path / "y.safetensors"))
    header = read_header(str(tmp_path / "y.safetensors"))
    assert all(torch.equal(read_tensor(header[n]), t) for n, t in tensors.items())

    incomplete = SafetensorsWriter(str(tmp_path / "z.safetensors"), [("a", torch.float32, (2,))])
    with pytest.raises(ConversionError, match="lacks"):
        incomplete.close()
    with open(tmp_path / "y.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "y.safetensors") - 4)
    with pytest.raises(ConversionError, match="truncated"):
        read_header(str(tmp_path / "y.safetensors"))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size(123) == 123
    with pytest.raises(ConversionError, match="cannot parse size"):
        parse_size("lots")


@pytest.mark.parametrize("kind, message", [
    ("missing", "1 missing: ['model.layers.1.mlp.down_proj.weight']"),
    ("unexpected", "1 unexpected: ['model.layers.0.mlp.extra.weight']"),
    ("shape", "model.layers.0.self_attn.k_proj.weight: (32, 32) (config says (16, 32))"),
    ("shard", "names 1 shard(s) missing"),
    ("bin", "has PyTorch .bin weights"),
    ("config", "has no config.json"),
])
def test_import_refuses_inconsistent_folders(tmp_path, kind, message):
    hf = str(tmp_path / "hf")
    if kind == "missing":
        write_fake_hf(hf, LLAMA_HF, drop=["model.layers.1.mlp.down_proj.weight"])
    elif kind == "unexpected":
        write_fake_hf(hf, LLAMA_HF, extra=["model.layers.0.mlp.extra.weight"])
    elif kind == "shape":
        write_fake_hf(hf, LLAMA_HF, reshape={"model.layers.0.self_attn.k_proj.weight": (32, 32)})
    else:
        write_fake_hf(hf, LLAMA_HF)
        if kind == "shard":
            os.remove(os.path.join(hf, "model-00002.safetensors"))
        elif kind == "bin":
            for name in os.listdir(hf):
                if "safetensors" in name:
                    os.remove(os.path.join(hf, name))
            torch.save({}, os.path.join(hf, "pytorch_model.bin"))
        elif kind == "config":
            os.remove(os.path.join(hf, "config.json"))
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError) as err:
        import_hf(hf, out, progress=False)
    assert message in str(err.value)
    assert not os.path.exists(out)


def test_conversions_refuse_a_non_empty_output_folder(tmp_path, capsys):
    hf = str(tmp_path / "hf")
    write_fake_hf(hf, LLAMA_HF)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli.main(["import-hf", hf, str(out), "--no-progress"]) == 5
    assert "exists and is not empty; choose a new folder or delete it" in capsys.readouterr().err
    assert cli.main(["export-hf", hf, str(out), "--no-progress"]) == 5
    assert "is not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_export_refuses_what_is_not_a_checkpoint(tmp_path):
    hf = str(tmp_path / "hf")
    write_fake_hf(hf, LLAMA_HF)
    with pytest.raises(ConversionError, match="neither a checkpoint folder"):
        export_hf(hf, str(tmp_path / "out"), progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("iter_0000005\n")
    with pytest.raises(ConversionError, match="not a checkpoint folder"):
        export_hf(str(run), str(tmp_path / "out"), progress=False)
