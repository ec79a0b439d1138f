"""Config validation: every bad value fails at construction, naming the key and the fix."""

from _infra import ROOT


def test_config_modules_import_no_megatron_core():
    """Loading a run config (every section's dataclass, the YAML reader) never imports
    megatron-core: a config can be read and validated before the CPU compatibility layer or
    the emulated GPU decides how megatron-core is imported, and without its import cost."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import megatron_ift.training.config, megatron_ift.config_io, megatron_ift.planning.cli\n"
        "from megatron_ift.training.config import load_run_config\n"
        "load_run_config('configs/demo.yaml')\n"
        "print(sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
