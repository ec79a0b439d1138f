"""Packing changes nothing a model can see: packed and one-by-one give the same IFT losses and
gradients with a tiny megatron-core GPT (RoPE and learned absolute positions).

The model runs in a subprocess (tests/_infra/workers/data_packing_equivalence.py): torch.distributed
and the CPU compatibility layer are per process. This test prepares the batches from the shipped
data through the real pipeline and judges the numbers.
"""

import json
import os

import pytest
import torch
from _infra import forkserver

from megatron_ift.data import DataConfig, build_data, collate
from megatron_ift.data.tokenizer import tokenizer_size

ROOT = forkserver.ROOT
WORKER = os.path.join(ROOT, "tests", "_infra", "workers", "data_packing_equivalence.py")
SEQ = 96
ROWS = 3
# float32 forward/backward of the same math in a different batch layout.
LOSS_ATOL, GRAD_ATOL = 2e-5, 2e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pack_model")
    with open(os.path.join(ROOT, "data", "sft_messages.jsonl")) as fh:
        lines = [next(fh) for _ in range(40)]
    src = tmp / "part.jsonl"
    src.write_text("".join(lines))
    kw = dict(
        paths=(str(src),),
        tokenizer_path=os.path.join(ROOT, "data", "tokenizer"),
        seq_length=SEQ,
        cache_dir=str(tmp / "cache"),
    )
    packed_data = build_data(DataConfig(**kw, packing=True))
    single = build_data(DataConfig(**kw, packing=False)).train
    packed = packed_data.train

    def turns(sample_id):
        return sum(m["role"] == "assistant" for m in json.loads(lines[sample_id])["messages"])

    def ids(r):
        return [int(packed.sample_ids[k]) for k in packed.row_samples(r)]

    # The rows holding the most samples (best-fit decreasing puts long samples first), one of
    # them with a multi-turn conversation.
    by_size = sorted(range(len(packed)), key=lambda r: (-len(packed.row_samples(r)), r))
    multi = next(r for r in by_size if len(ids(r)) > 1 and any(turns(i) > 1 for i in ids(r)))
    rows = [multi] + [r for r in by_size if r != multi][: ROWS - 1]
    order = [i for r in rows for i in ids(r)]
    row_of = {int(single.sample_ids[k]): k for k in range(len(single))}
    batch = collate([packed.row(r) for r in rows])
    assert batch.segment_ids.max() >= 2  # rows really hold several samples (and padding)
    multi_turn = sum(turns(i) > 1 for i in order)
    inputs = {  # plain tensors for torch.load(weights_only=True)
        "packed": vars(batch),
        "unpacked": [vars(collate([single.row(row_of[i])])) for i in order],
        "vocab": tokenizer_size(packed_data.tokenizer),
    }
    torch.save(inputs, tmp / "in.pt")
    proc = forkserver.run([WORKER, str(tmp / "in.pt"), str(tmp / "out.json")], timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads((tmp / "out.json").read_text())
    out["num_samples"], out["multi_turn"] = len(order), multi_turn
    return out


@pytest.mark.parametrize("pos_type", ["rope", "learned_absolute"])
def test_packed_equals_unpacked_with_segment_positions(results, pos_type):
    r = results[pos_type]
    assert r["reference_samples"] == results["num_samples"]
    assert results["multi_turn"] >= 1
    got = r["segment_positions"]
    assert got["num_samples"] == results["num_samples"]
    assert got["loss_max_abs"] <= LOSS_ATOL, got
    assert got["grad_max_abs"] <= GRAD_ATOL, got
    assert got["grad_ref_max"] > 1e-3  # gradients are not trivially zero


def test_rope_is_position_offset_invariant(results):
    # RoPE is relative: global positions inside a packed row give the same attention.
    got = results["rope"]["global_positions"]
    assert got["loss_max_abs"] <= LOSS_ATOL and got["grad_max_abs"] <= GRAD_ATOL, got


def test_controls_show_the_check_is_sensitive(results):
    # Absolute positions need per-segment position ids ...
    absolute = results["learned_absolute"]["global_positions"]
    assert absolute["loss_max_abs"] > 100 * LOSS_ATOL, absolute
    # ... and without the segment mask packed samples leak into each other.
    for pos_type in ("rope", "learned_absolute"):
        leak = results[pos_type]["causal_mask_only"]
        assert leak["loss_max_abs"] > 100 * LOSS_ATOL, leak
