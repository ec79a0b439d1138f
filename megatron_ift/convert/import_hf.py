"""Import a Hugging Face folder into a megatron-core distributed checkpoint (run-directory layout).

Output::

    <out>/
      latest                      # "iter_0000000"
      iter_0000000/               # torch_dist, TP1/PP1 key space: loads at any TP/PP
        megatron_ift.json         # {"step": 0, "model": ModelConfig, "hf": {arch, config, source}}
      tokenizer/                  # the HF tokenizer files (and generation_config.json)

The HF shards are only scanned (headers) up front; each megatron tensor is then assembled from
its HF tensors and written before the next one is read (:mod:`.streaming`), so peak memory is a
few times the largest single tensor whatever the model size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import torch
from tqdm import tqdm

from megatron_ift.checkpoint.layout import iter_name, mark_latest, write_metadata
from megatron_ift.convert import ConversionError
from megatron_ift.convert.arch import Architecture, TensorMap
from megatron_ift.convert.hf_config import model_config_from_hf
from megatron_ift.convert.safetensors_io import TensorEntry, read_header, read_tensor
from megatron_ift.convert.streaming import (
    layer_extra_state,
    meta_sharded_tensor,
    save_streaming,
    single_process_group,
)
from megatron_ift.models.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# Tokenizer (and generation) files copied between HF folders and our checkpoints.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_output_dir(path: str) -> None:
    """Refuse an output folder that exists and is not empty (never overwrite a checkpoint)."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(
            f"output folder {path} exists and is not empty; choose a new folder or delete it"
        )


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files present in ``src`` to ``dst``; returns their names."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if names:
        os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    return names


def scan_hf_weights(hf_dir: str) -> dict[str, TensorEntry]:
    """Every tensor of an HF folder's safetensors weights, from the shard headers only.

    Raises:
        ConversionError: no safetensors weights, a shard named by the index is missing, or the
            index and the shards disagree.
    """
    index_path = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if not os.path.isfile(os.path.join(hf_dir, n))]
        if missing:
            raise ConversionError(
                f"{index_path} names {len(missing)} shard(s) missing from {hf_dir}: "
                f"{missing[:5]}; download the complete model"
            )
    elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
        weight_map, files = {}, [SINGLE]
    else:
        bins = [n for n in os.listdir(hf_dir) if n.endswith(".bin")]
        hint = (
            " It has PyTorch .bin weights: re-save them as safetensors first "
            "(AutoModelForCausalLM.from_pretrained(d).save_pretrained(d2)) ."
            if bins else ""
        )
        raise ConversionError(f"{hf_dir} has no {INDEX} or {SINGLE}.{hint}")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        for tensor, entry in read_header(os.path.join(hf_dir, name)).items():
            if tensor in entries:
                raise ConversionError(f"tensor {tensor} is in both {entries[tensor].path} and "
                                      f"{entry.path}; the shards are inconsistent")
            entries[tensor] = entry
    wrong = [t for t, f in weight_map.items()
             if t not in entries or os.path.basename(entries[t].path) != f]
    if wrong:
        raise ConversionError(
            f"{index_path} maps {len(wrong)} tensor(s) to shards that do not hold them, e.g. "
            f"{wrong[:5]}; the index and the shards are from different downloads"
        )
    return entries


def check_hf_tensors(arch: Architecture, cfg: ModelConfig, entries: dict[str, TensorEntry]) -> None:
    """Refuse missing, unexpected or wrongly shaped tensors (config and weights disagree)."""
    expected = arch.expected_hf(cfg)
    missing = [n for n in expected if n not in entries]
    wrong = [f"{n}: {entries[n].shape} (config says {shape})"
             for n, shape in expected.items() if n in entries and entries[n].shape != shape]
    unexpected = [n for n in entries if n not in expected and not arch.tolerated_hf(cfg, n)]
    if missing or wrong or unexpected:
        parts = []
        for label, items in (("missing", missing), ("wrongly shaped", wrong),
                             ("unexpected", unexpected)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{len(items)} {label}: {items[:8]}{more}")
        raise ConversionError(
            f"the weights do not match config.json for {arch.hf_class} - " + "; ".join(parts)
            + ". Check that config.json belongs to these weights (layers, heads, sizes, "
            "tie_word_embeddings)"
        )


def _item_dtype(tmap: TensorMap, layer: Optional[int], entries: dict[str, TensorEntry],
                dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    found = {entries[n].dtype for n in tmap.hf_names(layer)}
    if len(found) != 1:
        raise ConversionError(f"{tmap.hf_names(layer)} mix dtypes {found}; pass --dtype")
    return found.pop()


def import_hf(
    hf_dir: str,
    output: str,
    *,
    make_vocab_size_divisible_by: int = 128,
    dtype: Optional[str] = None,
    max_position_embeddings: Optional[int] = None,
    transformer_impl: str = "auto",
    progress: bool = True,
) -> str:
    """Convert the HF folder ``hf_dir`` into a megatron-ift checkpoint folder ``output``.

    Args:
        hf_dir: folder with ``config.json``, safetensors weights (one file or shards + index)
            and tokenizer files.
        output: new (or empty) folder for the checkpoint.
        make_vocab_size_divisible_by: Megatron vocabulary padding multiple (per TP rank).
        dtype: cast the weights to ``float32`` / ``bfloat16`` / ``float16`` (default: keep).
        max_position_embeddings: override the HF value (needed for active sliding windows).
        transformer_impl: recorded in the model config.
        progress: show a progress bar (bytes written).

    Returns:
        The ``iter_0000000`` checkpoint folder.

    Raises:
        ConversionError: an unsupported model or option, config/weights mismatch, a missing
            shard, or a non-empty output folder.
    """
    check_output_dir(output)
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{hf_dir} has no config.json; point to a Hugging Face model folder")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {tuple(TORCH_DTYPES)}")
    cfg, arch = model_config_from_hf(
        hf_config,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=max_position_embeddings,
        params_dtype=dtype,
        transformer_impl=transformer_impl,
    )
    entries = scan_hf_weights(hf_dir)
    check_hf_tensors(arch, cfg, entries)
    cast = TORCH_DTYPES[dtype] if dtype else None

    num_layers = cfg.num_layers
    sharded: dict[str, Any] = {}
    plan: dict[tuple[str, tuple[int, ...]], tuple[TensorMap, Optional[int]]] = {}
    total = 0
    for tmap, layer in arch.items(cfg):
        shape = tmap.megatron_shape(cfg)
        item_dtype = _item_dtype(tmap, layer, entries, cast)
        sh_ten = meta_sharded_tensor(tmap.megatron, shape, item_dtype, layer, num_layers)
        name = tmap.megatron if layer is None else f"{tmap.megatron}.{layer}"
        sharded[name] = sh_ten
        plan[(sh_ten.key, tuple(sh_ten.global_offset))] = (tmap, layer)
        total += sh_ten.data.numel() * sh_ten.data.element_size()
    for key in arch.extra_state:
        for layer in range(num_layers):
            sharded[f"{key}.{layer}"] = layer_extra_state(key, layer, num_layers)

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="import-hf",
               disable=not progress)

    def produce(key: str, offset: tuple[int, ...]) -> torch.Tensor:
        tmap, layer = plan[(key, offset)]
        parts = [read_tensor(entries[n]) for n in tmap.hf_names(layer)]
        if cast is not None:
            parts = [p.to(cast) for p in parts]
        out = tmap.to_megatron(parts, cfg)
        del parts
        if layer is not None:
            out = out.unsqueeze(0)
        bar.update(out.numel() * out.element_size())
        return out

    ckpt_dir = os.path.join(output, iter_name(0))
    os.makedirs(output, exist_ok=True)
    try:
        with single_process_group():
            save_streaming({"model": sharded}, ckpt_dir, produce)
    except BaseException:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # ours, and incomplete: never leave it half
        raise
    finally:
        bar.close()
    write_metadata(ckpt_dir, {
        "step": 0,
        "model": dataclasses.asdict(cfg),
        "hf": {"arch": arch.name, "config": hf_config, "source": os.path.abspath(hf_dir)},
    })
    copy_tokenizer_files(hf_dir, os.path.join(output, TOKENIZER_DIR))
    mark_latest(output, 0)
    return ckpt_dir
