"""Peak resident memory of an import and an export run in this process.

Usage: ``convert_memory.py HF_DIR CKPT_OUT HF_OUT``; prints one JSON line with the resident set
size before the conversions (``baseline``, psutil, after every module is imported) and the peak
resident set size (the kernel's ``VmHWM``, reset between the two conversions) of each.
"""

import json
import sys


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


if __name__ == "__main__":
    import gc

    import psutil

    from megatron_ift.convert import cli, export_hf, import_hf, streaming  # noqa: F401

    hf_dir, ckpt, hf_out = sys.argv[1:4]
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    _reset_peak()
    rc_import = cli.main(["import-hf", hf_dir, ckpt, "--no-progress"])
    peak_import = _peak_bytes()
    gc.collect()
    after_import = psutil.Process().memory_info().rss
    _reset_peak()
    rc_export = cli.main(["export-hf", ckpt, hf_out, "--no-progress", "--max-shard-size", "10MB",
                          "--no-tokenizer"])
    peak_export = _peak_bytes()
    print(json.dumps({"baseline": baseline, "after_import": after_import,
                      "peak_import": peak_import, "peak_export": peak_export,
                      "rc": [rc_import, rc_export]}))
