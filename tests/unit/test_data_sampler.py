"""Sample order: deterministic in (seed, epoch), sliced per data-parallel rank, resumable."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from _infra import ROOT

from megatron_ift.data import DataConfig, ResumableSampler, build_data
from megatron_ift.data.preprocess import preprocess
from megatron_ift.validation import ConfigError

TOKENIZER = os.path.join(ROOT, "data", "tokenizer")


def sampler(n=50, **kw):
    args = dict(dp_rank=0, dp_size=1, micro_batch_size=2, num_microbatches=3, seed=11)
    args.update(kw)
    return ResumableSampler(n, **args)


def take(s, k):
    return [s.next_indices().tolist() for _ in range(k)]


def test_order_depends_only_on_seed_and_epoch():
    a, b = sampler(), sampler()
    assert np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert np.array_equal(a.epoch_order(3), b.epoch_order(3))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), sampler(seed=12).epoch_order(0))
    assert sorted(a.epoch_order(0).tolist()) == list(range(50))
    assert sampler(shuffle=False).epoch_order(5).tolist() == list(range(50))


@pytest.mark.parametrize("dp_size, mbs, nmb", [(1, 4, 2), (2, 2, 3), (4, 1, 2)])
def test_every_rank_gets_its_slice_of_every_global_batch(dp_size, mbs, nmb):
    n = 103
    ranks = [
        sampler(n, dp_rank=r, dp_size=dp_size, micro_batch_size=mbs, num_microbatches=nmb)
        for r in range(dp_size)
    ]
    g = mbs * nmb * dp_size
    per_epoch = n // g
    order = ranks[0].epoch_order(0)
    for step in range(per_epoch + 2):  # runs into epoch 1
        epoch, k = divmod(step, per_epoch)
        order = ranks[0].epoch_order(epoch)
        got = [[take(s, 1)[0] for _ in range(nmb)] for s in ranks]  # [rank][micro][mbs]
        flat = [i for r in got for m in r for i in m]
        assert sorted(flat) == sorted(order[k * g : (k + 1) * g].tolist())  # the global batch
        for r in range(dp_size):  # megatron layout: micro j, rank r -> [j*mbs*dp + r*mbs, ...)
            for j in range(nmb):
                lo = k * g + j * mbs * dp_size + r * mbs
                assert got[r][j] == order[lo : lo + mbs].tolist()


def test_resume_gives_the_same_next_batches():
    ref = sampler(dp_rank=1, dp_size=2)
    expected = take(ref, 40)  # crosses several epochs (50 // 12 = 4 global batches each)
    for n_before in (0, 3, 12, 17, 24):
        run = sampler(dp_rank=1, dp_size=2)
        assert take(run, n_before) == expected[:n_before]
        state = json.loads(json.dumps(run.state_dict()))  # survives any checkpoint format
        resumed = sampler(dp_rank=1, dp_size=2)
        resumed.load_state_dict(state)
        assert take(resumed, 40 - n_before) == expected[n_before:]


def test_resume_under_another_layout_sees_the_same_samples():
    # 2 ranks x mbs 2 x 3 micro-batches = 1 rank x mbs 4 x 3 micro-batches: same global batches.
    two = [sampler(dp_rank=r, dp_size=2) for r in range(2)]
    for s in two:
        take(s, 6)  # two optimizer steps
    one = sampler(micro_batch_size=4)
    one.load_state_dict(two[0].state_dict())
    nxt_two = sorted(i for s in two for i in np.concatenate(take(s, 3)).tolist())
    nxt_one = sorted(np.concatenate(take(one, 3)).tolist())
    assert nxt_two == nxt_one


def test_bad_states_and_layouts_are_rejected():
    s = sampler()
    take(s, 1)
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed=11"):
        sampler(seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=50"):
        sampler(n=60).load_state_dict(state)
    with pytest.raises(ValueError, match="micro-step boundary"):
        sampler(micro_batch_size=3).load_state_dict(state)
    with pytest.raises(ConfigError, match="dp_rank=2"):
        sampler(dp_rank=2, dp_size=2)
    with pytest.raises(ConfigError, match="fewer than one global batch of 60"):
        sampler(n=50, micro_batch_size=10, num_microbatches=3, dp_size=2)


def same(a, b):
    fields = [f.name for f in dataclasses.fields(a)]
    return all((getattr(a, k) is None and getattr(b, k) is None) or torch.equal(getattr(a, k), getattr(b, k))
               for k in fields)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampler_sft")
    with open(os.path.join(ROOT, "data", "sft_messages.jsonl")) as fh:
        lines = [next(fh) for _ in range(300)]
    (tmp / "a.jsonl").write_text("".join(lines))
    return build_data(
        DataConfig(
            paths=(str(tmp / "a.jsonl"),),
            tokenizer_path=TOKENIZER,
            seq_length=128,
            eval_fraction=0.1,
            cache_dir=str(tmp / "cache"),
        )
    )


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampler_pt")
    preprocess(
        [os.path.join(ROOT, "data", "pretrain_text.jsonl")],
        str(tmp / "text"),
        TOKENIZER,
        progress=False,
    )
    return build_data(
        DataConfig(
            format="pretrain",
            paths=(str(tmp / "text"),),
            tokenizer_path=TOKENIZER,
            seq_length=32,
            cache_dir=str(tmp / "cache"),
        )
    )


@pytest.mark.parametrize("which", ["sft_data", "pretrain_data"])
def test_iterator_resume_matches_uninterrupted_run(which, request):
    data = request.getfixturevalue(which)
    kw = dict(dp_rank=1, dp_size=2, micro_batch_size=2, num_microbatches=2)
    ref = data.train_iterator(**kw)
    expected = [next(ref) for _ in range(10)]
    run = data.train_iterator(**kw)
    for _ in range(6):
        next(run)
    resumed = data.train_iterator(**kw)
    resumed.load_state_dict(run.state_dict())
    for want in expected[6:]:
        assert same(next(resumed), want)
    assert expected[0].tokens.shape == (2, data.config.seq_length)
    assert (expected[0].segment_ids is not None) == data.config.packing


def test_sft_epochs_reshuffle_and_cover_all_rows(sft_data):
    it = sft_data.train_iterator(
        dp_rank=0, dp_size=1, micro_batch_size=1, num_microbatches=1, num_epochs=2
    )
    per_epoch = it.steps_per_epoch
    ids = [int(next(it).sample_ids[0]) for _ in range(2 * per_epoch)]
    with pytest.raises(StopIteration):
        next(it)
    rows = {int(sft_data.train.row(r)["sample_ids"]) for r in range(len(sft_data.train))}
    assert set(ids[:per_epoch]) == set(ids[per_epoch:]) == rows
    assert ids[:per_epoch] != ids[per_epoch:]


def test_eval_iterator_sees_every_row_once(sft_data):
    n = len(sft_data.eval)
    seen, pads = [], 0
    for r in range(3):
        for batch in sft_data.eval_iterator(dp_rank=r, dp_size=3, micro_batch_size=2):
            for i, sid in enumerate(batch.sample_ids.tolist()):
                if sid < 0:
                    pads += 1
                    assert batch.loss_mask[i].sum() == 0
                else:
                    seen.append(sid)
    assert sorted(seen) == sorted(int(sft_data.eval.row(r)["sample_ids"]) for r in range(n))
    assert pads == -n % 6
    assert not set(seen) & {
        int(sft_data.train.row(r)["sample_ids"]) for r in range(len(sft_data.train))
    }
