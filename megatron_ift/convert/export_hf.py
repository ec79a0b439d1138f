"""Export a megatron-ift checkpoint (saved at any TP/PP/VPP layout) to a Hugging Face folder.

Output: ``model-0000k-of-0000n.safetensors`` shards, ``model.safetensors.index.json``,
``config.json`` and the tokenizer files, loadable by ``AutoModelForCausalLM.from_pretrained``.

The checkpoint is read one tensor (one layer's slice of a stacked tensor) at a time and each HF
tensor is written into its precomputed place in its shard (:mod:`.safetensors_io`), so peak
memory is a few times the largest single tensor. Padded vocabulary rows are dropped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Union

import torch
from tqdm import tqdm

from megatron_ift.checkpoint.layout import CheckpointError, read_metadata, resolve
from megatron_ift.convert import ConversionError
from megatron_ift.convert.arch import Architecture, get_architecture, is_model_key
from megatron_ift.convert.hf_config import hf_config_from_model
from megatron_ift.convert.import_hf import (
    INDEX,
    TOKENIZER_DIR,
    TORCH_DTYPES,
    check_output_dir,
    copy_tokenizer_files,
)
from megatron_ift.convert.safetensors_io import SafetensorsWriter, tensor_nbytes
from megatron_ift.convert.streaming import DistCheckpointReader, single_process_group
from megatron_ift.models.config import ModelConfig

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``5GB`` (10^9, as Hugging Face counts), ``4GiB`` (2^30), ``500MB`` or an int."""
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(size)
    if not m:
        raise ConversionError(f"cannot parse size {size!r}; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * (_UNITS[m.group(2).upper()] if m.group(2) else 1))


def load_model_config(meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's metadata."""
    if "model" not in meta:
        raise ConversionError("the checkpoint metadata has no 'model' entry (ModelConfig); "
                              "it was not written by megatron-ift")
    return ModelConfig.from_dict(meta["model"], source="the checkpoint's metadata")


def check_checkpoint(reader: DistCheckpointReader, arch: Architecture, cfg: ModelConfig) -> None:
    """Refuse a checkpoint whose model tensors do not match its model config / architecture."""
    stored = reader.tensors()
    missing, wrong = [], []
    expected = set()
    for tmap in arch.active(cfg):
        key = tmap.megatron
        expected.add(key)
        if key not in stored:
            missing.append(key)
            continue
        shape = stored[key][0]
        rows = shape[0] if tmap.transform == "vocab" else None
        want = tmap.megatron_shape(cfg, vocab_rows=rows)
        if tmap.per_layer:
            want = (cfg.num_layers, *want)
        if shape != want or (rows is not None and rows < cfg.vocab_size):
            wrong.append(f"{key}: {shape} (model config says {want})")
    unexpected = [k for k in stored if is_model_key(k) and k not in expected]
    if missing or wrong or unexpected:
        raise ConversionError(
            f"checkpoint {reader.checkpoint_dir} does not match its model config as "
            f"{arch.hf_class}: missing {missing}, wrongly shaped {wrong}, unexpected "
            f"{unexpected}. Is --arch right, and is megatron_ift.json from this checkpoint?"
        )


def _training_origin(meta: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What a training run's metadata says about where the model came from: the HF record of
    its ``checkpoint.pretrained`` start (an import) and tokenizer folders to try."""
    run_config = meta.get("config") or {}
    tokenizers = []
    tokenizer_path = (run_config.get("data") or {}).get("tokenizer_path")
    if tokenizer_path:
        tokenizers.append(tokenizer_path)
    pretrained = (run_config.get("checkpoint") or {}).get("pretrained")
    if not pretrained or not os.path.isdir(pretrained):
        return {}, tokenizers
    try:
        start = resolve(pretrained)
        origin = read_metadata(start) if start else {}
    except CheckpointError:
        return {}, tokenizers
    if start:
        tokenizers.append(os.path.join(os.path.dirname(os.path.abspath(start)), TOKENIZER_DIR))
    return origin.get("hf") or {}, tokenizers


def tokenizer_candidates(ckpt_dir: str, meta: dict[str, Any]) -> list[str]:
    """Where a checkpoint's tokenizer may be, in order: ``tokenizer/`` beside it (an import),
    the training run's ``data.tokenizer_path``, the ``tokenizer/`` of its pretrained import.

    Args:
        ckpt_dir: the ``iter_*`` folder.
        meta: its ``megatron_ift.json``.

    Returns:
        Candidate folders (not checked for existence).
    """
    return [os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), TOKENIZER_DIR),
            *_training_origin(meta)[1]]


def _load_hf_config(path: str) -> dict[str, Any]:
    """A ``config.json`` file, or the HF config recorded in an imported checkpoint folder."""
    if os.path.isdir(path):
        try:
            ckpt = resolve(path)
            config = (read_metadata(ckpt).get("hf") or {}).get("config") if ckpt else None
        except CheckpointError as exc:
            raise ConversionError(str(exc)) from exc
        if config is None:
            raise ConversionError(f"--hf-config {path}: no HF config recorded in that checkpoint; "
                                  "pass a config.json file")
        return config
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"--hf-config {path}: {exc}") from exc


def export_hf(
    checkpoint: str,
    output: str,
    *,
    arch: Optional[str] = None,
    dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = "5GB",
    tokenizer: Optional[str] = None,
    copy_tokenizer: bool = True,
    hf_config: Optional[str] = None,
    progress: bool = True,
) -> str:
    """Convert a megatron-ift checkpoint into the HF folder ``output``.

    Args:
        checkpoint: an ``iter_*`` folder, or a run folder whose ``latest`` names one.
        output: new (or empty) folder.
        arch: ``llama`` / ``mistral`` / ``qwen2`` (default: recorded at import, or at the
            import a training run started from; else ``qwen2`` for models with q/k/v biases and
            ``llama`` otherwise).
        dtype: cast to ``float32`` / ``bfloat16`` / ``float16`` (default: the stored dtype).
        max_shard_size: largest shard (``5GB``, ``500MB``, bytes).
        tokenizer: folder of tokenizer files (default: the first of ``tokenizer/`` beside the
            checkpoint, the training run's ``data.tokenizer_path``, the ``tokenizer/`` of the
            run's ``checkpoint.pretrained`` import).
        copy_tokenizer: False to write the weights and config only.
        hf_config: a ``config.json``, or an imported checkpoint folder, whose
            non-architecture fields (token ids, ...) to keep (default: the one recorded at
            import, or at the import a training run started from).
        progress: show a progress bar (bytes written).

    Returns:
        ``output``.

    Raises:
        ConversionError: no checkpoint, a mismatching checkpoint, no tokenizer, a non-empty
            output folder, or a model the HF architecture cannot express.
    """
    check_output_dir(output)
    try:
        ckpt_dir = resolve(checkpoint) if os.path.isdir(checkpoint) else None
        if ckpt_dir is None:
            raise ConversionError(
                f"{checkpoint} is neither a checkpoint folder (iter_*/ with megatron_ift.json) "
                "nor a run folder whose 'latest' names one"
            )
        meta = read_metadata(ckpt_dir)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from exc
    cfg = load_model_config(meta)
    origin_hf, _ = _training_origin(meta)
    hf_meta = meta.get("hf") or origin_hf
    architecture = get_architecture(
        arch or hf_meta.get("arch") or ("qwen2" if cfg.add_qkv_bias else "llama")
    )
    base = _load_hf_config(hf_config) if hf_config is not None else hf_meta.get("config")
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {tuple(TORCH_DTYPES)}")
    candidates = tokenizer_candidates(ckpt_dir, meta)
    tokenizer_dir = tokenizer or next((c for c in candidates if os.path.isdir(c)), None)
    if copy_tokenizer and (tokenizer_dir is None or not os.path.isdir(tokenizer_dir)):
        raise ConversionError(
            f"no tokenizer folder for {ckpt_dir} (tried {tokenizer or candidates}); pass "
            "--tokenizer DIR (e.g. the imported checkpoint's tokenizer/ or the original HF "
            "folder) or --no-tokenizer"
        )
    shard_limit = parse_size(max_shard_size)
    cast = TORCH_DTYPES[dtype] if dtype else None

    with single_process_group():
        reader = DistCheckpointReader(ckpt_dir)
        check_checkpoint(reader, architecture, cfg)
        stored = reader.tensors()
        items = architecture.items(cfg)

        # Plan every HF tensor's shard and place before reading any data.
        planned: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for tmap, layer in items:
            out_dtype = cast or stored[tmap.megatron][1]
            shapes = tmap.hf_shapes(cfg)
            planned += [(n, out_dtype, s) for n, s in zip(tmap.hf_names(layer), shapes)]
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in planned:
            n = tensor_nbytes(entry[1], entry[2])
            if shards[-1] and size + n > shard_limit:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        where = {e[0]: k for k, shard in enumerate(shards) for e in shard}
        remaining = [len(s) for s in shards]
        writers: dict[int, SafetensorsWriter] = {}
        total = sum(tensor_nbytes(d, s) for _, d, s in planned)
        config_dtype = {v: k for k, v in TORCH_DTYPES.items()}.get(planned[0][1], "float32")
        config = hf_config_from_model(cfg, architecture, dtype=config_dtype, base=base)

        os.makedirs(output, exist_ok=True)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export-hf",
                  disable=not progress) as bar:
            for tmap, layer in items:
                tensor = reader.read(tmap.megatron, layer if tmap.per_layer else None)
                hf_tensors = tmap.to_hf(tensor, cfg)
                del tensor
                for name, t in zip(tmap.hf_names(layer), hf_tensors):
                    if cast is not None:
                        t = t.to(cast)
                    k = where[name]
                    if k not in writers:
                        writers[k] = SafetensorsWriter(os.path.join(output, names[k]), shards[k])
                    writers[k].write(name, t)
                    bar.update(t.numel() * t.element_size())
                    remaining[k] -= 1
                    if remaining[k] == 0:
                        writers.pop(k).close()

    index = {"metadata": {"total_size": total},
             "weight_map": {name: names[k] for name, k in where.items()}}
    with open(os.path.join(output, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if copy_tokenizer:
        copy_tokenizer_files(tokenizer_dir, output)
    return output
