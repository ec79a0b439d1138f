"""Both conversions stream: peak memory follows the largest tensor, not the model.

A 304 MiB float32 Llama-layout model in 32 safetensors shards (largest tensor 8 MiB) is imported
and exported in a subprocess that reports its baseline RSS (psutil) and the kernel's peak RSS
(VmHWM) of each conversion. Holding the model would cost at least its 304 MiB; the stated bound
is 6 x the largest tensor + 48 MiB (process-group set-up, planning, allocator slack) = 96 MiB
above the baseline. Measured on the development machine: about +60 MiB (import) and +20 MiB
(export).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from _infra import ROOT
from safetensors.torch import load_file, save_file

from megatron_ift.convert.hf_config import model_config_from_hf

MiB = 2**20

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 512,
    "intermediate_size": 1536, "num_hidden_layers": 24, "num_attention_heads": 8,
    "num_key_value_heads": 4, "vocab_size": 4096, "max_position_embeddings": 1024,
    "torch_dtype": "float32", "tie_word_embeddings": False,
}
SHARD_BYTES = 10_000_000


def _write_sharded_model(path):
    """Random weights for CONFIG in ~10 MB shards; returns (total bytes, largest tensor bytes,
    number of shards)."""
    os.makedirs(path)
    cfg, arch = model_config_from_hf(CONFIG)
    g = torch.Generator().manual_seed(0)
    shard, size, weight_map, names = {}, 0, {}, []

    def flush():
        name = f"model-{len(names) + 1:05d}-of-xxxxx.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)

    total = largest = 0
    for tensor_name, shape in arch.expected_hf(cfg).items():
        t = torch.randn(shape, generator=g)
        n = t.numel() * t.element_size()
        total, largest = total + n, max(largest, n)
        if shard and size + n > SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[tensor_name] = t
        size += n
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    return total, largest, len(names)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux VmHWM reset")
def test_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    hf_dir = str(tmp_path / "hf")
    total, largest, shards = _write_sharded_model(hf_dir)
    assert shards >= 30 and largest == 8 * MiB
    bound = 6 * largest + 48 * MiB
    assert total > 3 * bound  # a non-streaming conversion could not meet the bound

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_infra", "workers", "convert_memory.py"), hf_dir,
         str(tmp_path / "ckpt"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == [0, 0], proc.stderr[-3000:]
    import_growth = report["peak_import"] - report["baseline"]
    export_growth = report["peak_export"] - report["after_import"]
    print(f"model {total / MiB:.0f} MiB in {shards} shards, largest tensor {largest / MiB:.0f} "
          f"MiB: peak RSS +{import_growth / MiB:.0f} MiB (import), +{export_growth / MiB:.0f} "
          f"MiB (export), bound {bound / MiB:.0f} MiB")
    assert import_growth < bound
    assert export_growth < bound

    # The streamed conversions are still exact (spot-check the first and last exported shard).
    exported = sorted(n for n in os.listdir(tmp_path / "out") if n.endswith(".safetensors"))
    assert len(exported) >= 30
    originals = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            originals.update(load_file(os.path.join(hf_dir, name)))
    for name in (exported[0], exported[-1]):
        for key, tensor in load_file(str(tmp_path / "out" / name)).items():
            assert torch.equal(tensor, originals[key]), key
