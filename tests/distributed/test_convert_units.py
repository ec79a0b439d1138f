"""Conversion pieces without megatron models: the name/shape map, the layout transforms, the
config mapping, safetensors streaming I/O and every refusal (single process, seconds)."""
import os

from _infra import forkserver


def test_tool_wrapper_runs_the_cli():
    proc = forkserver.run([os.path.join(forkserver.ROOT, "tools", "convert_checkpoint.py"),
                           "import-hf", "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: convert_checkpoint.py import-hf" in proc.stdout
    assert "--make-vocab-size-divisible-by" in proc.stdout
