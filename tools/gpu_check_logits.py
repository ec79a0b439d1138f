"""Part 4 of tools/gpu_check.py: SmolLM2-135M-Instruct's logits, megatron-core on this machine's
GPU (fp32, TP1) against transformers on the CPU (fp32), for one chat prompt.

Usage: python tools/gpu_check_logits.py WORK_DIR   (prints one JSON line)
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    work = sys.argv[1]
    hf, mcore = os.path.join(work, "smollm2_hf"), os.path.join(work, "smollm2_mcore")
    cli = [sys.executable, "-m", "megatron_ift.cli", "convert"]
    if not os.path.isdir(hf):
        subprocess.run([*cli, "gguf-to-hf", "--smollm2", hf], check=True, cwd=ROOT)
    if not os.path.isdir(mcore):
        subprocess.run([*cli, "import-hf", hf, mcore], check=True, cwd=ROOT)

    from megatron_ift.platform import bootstrap

    platform = bootstrap()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_ift.distributed import init_distributed, model_parallel_seed
    from megatron_ift.inference.loading import load_for_inference
    from megatron_ift.parallel import ParallelConfig

    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(ids).logits[0]  # [s, v]
    init_distributed(ParallelConfig(), platform)
    model_parallel_seed(1234, platform)
    model, cfg, _ = load_for_inference(mcore, None, platform)
    device = next(model.parameters()).device
    pos = torch.arange(ids.shape[1], device=device)[None]
    with torch.no_grad():
        ours = model(ids.to(device), pos, None)[0, :, : ref.shape[-1]].float().cpu()  # [s, v]
    diff = (ours - ref).abs().max().item()
    print(json.dumps({
        "ok": diff < 1e-2 and bool((ours.argmax(-1) == ref.argmax(-1)).all()),
        "device": str(device), "tokens": int(ids.shape[1]), "max_abs_logit_difference": diff,
        "max_abs_logit": ref.abs().max().item(),
        "argmax_equal": bool((ours.argmax(-1) == ref.argmax(-1)).all()),
    }))


if __name__ == "__main__":
    main()
