#!/usr/bin/env bash
# The prepared GPU check (docs/scale_out.md, "GPU check"): one command on a machine with one CUDA
# GPU and its own torch; it never installs or replaces torch. Results: OUT_DIR/gpu_check.json.
#   bash tools/gpu_check.sh [OUT_DIR]
# Python packages the machine lacks (megatron-core's cp312 wheel, datasets and its small
# dependencies) travel as wheels in .whl/ (tools/gpu_wheels.sh downloads them) and are installed
# into /tmp/site without touching the environment's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import megatron.core, datasets" 2>/dev/null || {
  echo "gpu_check: megatron-core or datasets is missing; run tools/gpu_wheels.sh where pip works and carry .whl/" >&2
  exit 2
}
PYTHONUNBUFFERED=1 exec python3 tools/gpu_check.py --out "$out" "${@:2}"
