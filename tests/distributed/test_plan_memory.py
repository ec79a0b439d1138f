"""The planner's memory formulas against real megatron-core models, DDP and optimizers (CPU).

One 2-process gloo run (tests/_infra/workers/plan_memory.py) builds each case and compares on every
rank, with zero tolerance:

* parameter names and shapes per model chunk (TP shards, PP stages, VPP chunks, tied and GPT-2
  style variants) with ``chunk_parameters``;
* bytes of weights (the DDP param buffer), gradients (``main_grad`` buffer), fp32 master shards
  and Adam moments with ``state_memory`` (distributed optimizer with its padding and buckets,
  fp32 models, bf16 gradients, no distributed optimizer);
* bytes of distinct tensors saved for backward (``saved_tensors_hooks``) with ``saved_bytes``
  for the local layer spec: TP 2 with and without sequence parallelism, selective and full
  recomputation, grouped and plain multi-head attention, context parallelism (CP 2: the
  all-gathered keys and values, the per-chunk kernel calls; CP rank 0 has one mask fewer).
"""

import re

import pytest
from _infra.launch import torchrun

pytestmark = pytest.mark.dist


def test_planner_bytes_equal_megatron_core_objects():
    out = torchrun("plan_memory.py", 2, timeout=240)
    cases = re.findall(r"^CASE (.+?) OK", out, flags=re.M)
    total = re.search(r"^ALL (\d+) CASES OK", out, flags=re.M)
    assert total, out[-3000:]
    assert len(cases) == int(total.group(1)) >= 18, cases
