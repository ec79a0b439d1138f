#!/usr/bin/env bash
# Download, where pip works, the wheels tools/gpu_check.sh needs on a GPU machine that has torch,
# transformers, tokenizers, safetensors, pyyaml, tqdm, tensorboard, pandas, pyarrow, xxhash and
# fsspec but no package index (Python 3.12): megatron-core and datasets with its missing needs.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl megatron-core==0.16.1 datasets dill multiprocess
ls -la .whl
