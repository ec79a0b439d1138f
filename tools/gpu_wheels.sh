#!/usr/bin/env bash
# Download, where pip works, the wheels tools/gpu_check.sh needs on a GPU machine that has torch,
# transformers, tokenizers, safetensors, pyyaml, tqdm, tensorboard, pandas, pyarrow, xxhash,
# fsspec and huggingface-hub but no package index (Python 3.12): megatron-core and datasets with
# its missing needs. Every version is pinned: the wheels are installed --no-deps, so a newer
# datasets (which wants a newer pyarrow / huggingface-hub than such a machine has) must not slip
# in. datasets 4.4.1 takes huggingface-hub >= 0.25, < 2 and pyarrow >= 21; dill and multiprocess
# are the newest it accepts. gpu_check.py's environment part checks the installed versions
# against these wheels' requirements and names any mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl megatron-core==0.16.1 datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18
ls -la .whl
