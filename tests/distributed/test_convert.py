"""HF <-> Megatron conversion against ``transformers`` on tiny random models.

One module fixture builds four HF folders (Llama with GQA and sharded weights, Llama-3 rope
scaling with tied embeddings, Mistral, Qwen2 with q/k/v biases and tied embeddings), imports
them with the CLI, loads every import at TP1, TP2, PP2 and TP2xPP2 in one 4-process torchrun
launch (re-saving two of them at TP1 and TP2xPP2), and exports the imports and the re-saves back
to HF. The tests then compare logits with ``transformers`` and weights bit for bit.
"""

import glob
import json
import os

import pytest
import torch
from _infra.launch import torchrun

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402

from megatron_ift.checkpoint.layout import read_metadata, resolve  # noqa: E402
from megatron_ift.convert import cli  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]

VOCAB = 150
DIVISIBLE = 32  # padded vocabulary: 160 at TP1, 192 at TP2 (loads across a padding change)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
RESAVED = ("llama", "qwen2")  # re-saved at TP1xPP1 and TP2xPP2 by megatron-core
RESAVED_LAYOUTS = {"llama": ("tp1pp1", "tp2pp2", "tp1pp2vpp2"), "qwen2": ("tp1pp1", "tp2pp2")}
ATOL = 1e-4

_COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256)
_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# name -> (config class, config kwargs, save_pretrained max_shard_size)
MODELS = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=4, tie_word_embeddings=False), "60KB"),
    "llama3": ("LlamaConfig", dict(num_hidden_layers=2, tie_word_embeddings=True,
                                   rope_theta=500000.0, max_position_embeddings=16384,
                                   rope_scaling=_LLAMA3_SCALING), "60KB"),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=None,
                                      tie_word_embeddings=False), "60KB"),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=True,
                                  rope_theta=1e6, use_sliding_window=False), "10GB"),
}


def _hf_model(name, **overrides):
    cls_name, kwargs, _ = MODELS[name]
    config = getattr(transformers, cls_name)(**{**_COMMON, **kwargs, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _randomize(model, seed):
    """O(1) logits and distinct norms, so that swapped or mis-laid tensors show up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def _save_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    fast.save_pretrained(path)


def _load_folder(path):
    tensors = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors


def _run_cli(argv):
    assert cli.main([*argv, "--no-progress"]) == 0, argv


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    tokens_path = str(root / "tokens.pt")
    torch.save(tokens, tokens_path)
    out = {"root": root, "tokens": tokens, "ref": {}, "hf": {}, "imp": {}}
    for i, name in enumerate(MODELS):
        model = _hf_model(name)
        _randomize(model, seed=i)
        hf_dir = str(root / f"hf_{name}")
        model.save_pretrained(hf_dir, max_shard_size=MODELS[name][2])
        _save_tokenizer(hf_dir)
        with torch.no_grad():
            out["ref"][name] = model(tokens).logits
        out["hf"][name] = hf_dir
        out["imp"][name] = str(root / f"imp_{name}")
        _run_cli(["import-hf", hf_dir, out["imp"][name],
                  "--make-vocab-size-divisible-by", str(DIVISIBLE)])

    spec = {"layouts": [], "keys_out": str(root / "keys_llama.json")}
    for tp, pp in LAYOUTS:
        jobs = []
        for name in MODELS:
            resave = None
            if name in RESAVED and (tp, pp) in ((1, 1), (2, 2)):
                resave = str(root / f"resave_{name}_tp{tp}pp{pp}")
            jobs.append({"ckpt": out["imp"][name], "tokens": tokens_path, "resave": resave,
                         "out": str(root / f"logits_{name}_tp{tp}pp{pp}.pt")})
        spec["layouts"].append({"tp": tp, "pp": pp, "jobs": jobs})
    # Interleaved pipeline (2 stages x 2 virtual chunks of the 4-layer Llama): re-save only.
    spec["layouts"].append({"tp": 1, "pp": 2, "vpp": 2, "jobs": [
        {"ckpt": out["imp"]["llama"], "resave": str(root / "resave_llama_tp1pp2vpp2")}]})
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec))
    torchrun("convert_logits.py", 4, str(spec_path), timeout=400)

    out["exp"] = {}
    for name in MODELS:
        out["exp"][name] = str(root / f"exp_{name}")
        _run_cli(["export-hf", out["imp"][name], out["exp"][name], "--max-shard-size", "100KB"])
    for name, layouts in RESAVED_LAYOUTS.items():
        for layout in layouts:
            ckpt = str(root / f"resave_{name}_{layout}")
            out["exp"][f"{name}_{layout}"] = str(root / f"exp_{name}_{layout}")
            _run_cli(["export-hf", ckpt, out["exp"][f"{name}_{layout}"],
                      "--tokenizer", os.path.join(out["imp"][name], "tokenizer")])
    return out


def test_import_has_the_model_sharded_keys_and_shapes(converted):
    """The streamed checkpoint holds exactly the keys / global shapes / objects that
    GPTModel.sharded_state_dict() has at TP1xPP1."""
    with open(converted["root"] / "keys_llama.json") as f:
        model_keys = json.load(f)
    md = FileSystemReader(resolve(converted["imp"]["llama"])).read_metadata()
    ckpt_keys = {
        k: (list(v.size) if isinstance(v, TensorStorageMetadata) else None)
        for k, v in md.state_dict_metadata.items()
    }
    assert ckpt_keys == model_keys
    assert sum(v is None for v in ckpt_keys.values()) == 4 * 4  # 4 extra states x 4 layers


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"tp{x[0]}pp{x[1]}")
@pytest.mark.parametrize("name", list(MODELS))
def test_imported_logits_match_transformers(converted, name, layout):
    tp, pp = layout
    logits = torch.load(converted["root"] / f"logits_{name}_tp{tp}pp{pp}.pt")
    ref = converted["ref"][name]
    padded = ((VOCAB + DIVISIBLE * tp - 1) // (DIVISIBLE * tp)) * DIVISIBLE * tp
    assert logits.shape == (*ref.shape[:2], padded)
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    torch.testing.assert_close(logits[..., :VOCAB], ref, rtol=0, atol=ATOL)
    # Padded vocabulary rows of the output layer are zero.
    assert torch.count_nonzero(logits[..., VOCAB:]) == 0


def test_llama3_rope_scaling_is_imported_and_matters(converted):
    meta = read_metadata(resolve(converted["imp"]["llama3"]))
    assert meta["model"]["rope_scaling"] is True
    assert meta["model"]["rope_scaling_factor"] == 8.0
    assert meta["model"]["rotary_base"] == 500000.0
    # The same weights without the scaling give different logits, so the match above (1e-4)
    # checks that megatron-core applies the same scaling as transformers.
    scaled = _hf_model("llama3")
    _randomize(scaled, seed=list(MODELS).index("llama3"))
    plain = _hf_model("llama3", rope_scaling=None)
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        diff = (plain(converted["tokens"]).logits - converted["ref"]["llama3"]).abs().max()
    assert diff > 100 * ATOL


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact_and_loads_in_transformers(converted, name):
    original = _load_folder(converted["hf"][name])
    exported_dir = converted["exp"][name]
    exported = _load_folder(exported_dir)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key

    with open(os.path.join(exported_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(index["weight_map"]) == sorted(original)
    assert shards == sorted(os.path.basename(p) for p in glob.glob(f"{exported_dir}/*.safetensors"))
    total = sum(t.numel() * t.element_size() for t in original.values())
    assert index["metadata"]["total_size"] == total

    model = transformers.AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.float32)
    assert type(model).__name__ == MODELS[name][0].replace("Config", "ForCausalLM")
    with torch.no_grad():
        logits = model.eval()(converted["tokens"]).logits
    torch.testing.assert_close(logits, converted["ref"][name], rtol=0, atol=1e-6)

    for fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(converted["hf"][name], fname), "rb") as a, \
                open(os.path.join(exported_dir, fname), "rb") as b:
            assert a.read() == b.read(), fname
    # (AutoTokenizer would pick Qwen2's own tokenizer class from config.json for qwen2.)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(exported_dir)
    assert tokenizer("w1 w7 w39 unknown w2")["input_ids"] == [4, 10, 42, 0, 5]


def test_exported_config_matches_original(converted):
    for name in MODELS:
        original = transformers.AutoConfig.from_pretrained(converted["hf"][name])
        exported = transformers.AutoConfig.from_pretrained(converted["exp"][name])
        for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "vocab_size",
                      "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                      "rope_parameters", "bos_token_id", "eos_token_id", "dtype"):
            assert getattr(exported, field) == getattr(original, field), (name, field)
        # Qwen2's config has no head_dim field (it is hidden / heads); ours writes it out.
        assert getattr(exported, "head_dim", None) == getattr(original, "head_dim", 16) == 16


@pytest.mark.parametrize("name", RESAVED)
def test_export_is_independent_of_the_saved_layout(converted, name):
    """megatron-core saves at TP2xPP2 (and PP2 x VPP2) and TP1xPP1 of the same parameters
    export identically (and equal the original HF weights)."""
    tp1 = _load_folder(converted["exp"][f"{name}_tp1pp1"])
    original = _load_folder(converted["hf"][name])
    assert sorted(tp1) == sorted(original)
    for layout in RESAVED_LAYOUTS[name][1:]:
        other = _load_folder(converted["exp"][f"{name}_{layout}"])
        assert sorted(other) == sorted(tp1)
        for key in original:
            assert torch.equal(other[key], tp1[key]), (layout, key)
    for key in original:
        assert torch.equal(tp1[key], original[key]), key
    # The TP2 save really was at a different layout: its embedding is padded for TP2.
    md = FileSystemReader(resolve(str(converted["root"] / f"resave_{name}_tp2pp2"))).read_metadata()
    assert list(md.state_dict_metadata["embedding.word_embeddings.weight"].size) == [192, 64]


def test_export_refuses_a_mismatching_architecture(converted, tmp_path, capsys):
    out = str(tmp_path / "wrong")
    assert cli.main(["export-hf", converted["imp"]["llama"], out, "--arch", "qwen2",
                     "--no-progress"]) == 5  # ConversionError's exit code
    err = capsys.readouterr().err
    assert "add_qkv_bias=False does not fit Qwen2ForCausalLM" in err and "--arch llama" in err
    assert not os.path.exists(out)


def test_dtype_casts_on_import_and_export(converted, tmp_path):
    """--dtype bfloat16 on import stores bf16 (and records it); --dtype float32 on export gives
    back exactly the bf16-rounded original weights."""
    ckpt, out = str(tmp_path / "bf16"), str(tmp_path / "f32")
    _run_cli(["import-hf", converted["hf"]["qwen2"], ckpt, "--dtype", "bfloat16"])
    meta = read_metadata(resolve(ckpt))
    assert meta["model"]["params_dtype"] == "bfloat16"
    md = FileSystemReader(resolve(ckpt)).read_metadata()
    dtypes = {v.properties.dtype for v in md.state_dict_metadata.values()
              if isinstance(v, TensorStorageMetadata)}
    assert dtypes == {torch.bfloat16}
    _run_cli(["export-hf", ckpt, out, "--dtype", "float32"])
    original = _load_folder(converted["hf"]["qwen2"])
    exported = _load_folder(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor.bfloat16().float()), key
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config.get("dtype", config.get("torch_dtype")) == "float32"


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_export_without_recorded_hf_config(converted, tmp_path, name):
    """A checkpoint whose metadata has only the ModelConfig exports a config.json built from
    scratch (architecture inferred) that transformers loads exactly."""
    import shutil

    ckpt = tmp_path / "run"
    shutil.copytree(converted["imp"][name], ckpt)
    meta_path = ckpt / "iter_0000000" / "megatron_ift.json"
    meta = json.loads(meta_path.read_text())
    del meta["hf"]
    meta_path.write_text(json.dumps(meta))
    out = str(tmp_path / "hf")
    _run_cli(["export-hf", str(ckpt), out])  # tokenizer/ beside iter_0000000 is found
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert "rope_parameters" not in config and config["torch_dtype"] == "float32"
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == MODELS[name][0].replace("Config", "ForCausalLM")
    with torch.no_grad():
        logits = model.eval()(converted["tokens"]).logits
    torch.testing.assert_close(logits, converted["ref"][name], rtol=0, atol=1e-6)


def test_export_of_a_training_run_uses_its_pretrained_import(converted, tmp_path):
    """A training run's checkpoint (metadata: model, parallel, run config with
    checkpoint.pretrained, no HF record, no tokenizer beside it) exports with the original HF
    config and tokenizer of the import it started from."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(os.path.join(converted["root"], "resave_qwen2_tp2pp2", "iter_0000000"),
                    run / "iter_0000007")
    (run / "latest").write_text("iter_0000007\n")
    meta_path = run / "iter_0000007" / "megatron_ift.json"
    meta = json.loads(meta_path.read_text())
    meta = {"step": 7, "model": meta["model"], "parallel": {"tensor_model_parallel_size": 2},
            "config": {"checkpoint": {"pretrained": converted["imp"]["qwen2"]},
                       "data": {"tokenizer_path": None}}}
    meta_path.write_text(json.dumps(meta))
    out = str(tmp_path / "hf")
    _run_cli(["export-hf", str(run), out])
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    with open(os.path.join(converted["hf"]["qwen2"], "config.json")) as f:
        original = json.load(f)
    exported.pop("transformers_version", None)
    original.pop("transformers_version", None)
    assert exported == {**original, "head_dim": 16}
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert sorted(_load_folder(out)) == sorted(_load_folder(converted["hf"]["qwen2"]))
