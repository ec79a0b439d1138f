"""The production IFT math (megatron_ift.ift) against the spec reference, single process."""

import itertools

import pytest
import torch
from _infra import reference

from megatron_ift.ift import (
    Groups,
    IFTConfig,
    estimate,
    estimated_sequence,
    ift_loss_terms,
    linear_label_logprobs,
)


def _batch(b=3, s=12, v=11, dtype=torch.float64, seed=0, packed=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, v, generator=g, dtype=dtype) * 2
    tokens = torch.randint(0, v, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.zeros(b, s, dtype=torch.long)
    loss_mask[0, 4:-1] = 1  # prompt of 4
    loss_mask[1, 2:7] = 1
    loss_mask[1, 8:-1] = 1  # two answer turns
    # row 2 is all prompt: n = 0 must contribute nothing
    segment_ids = None
    if packed:
        loss_mask[2, 2:5] = 1
        loss_mask[2, 7:10] = 1
        segment_ids = torch.zeros(b, s, dtype=torch.long)
        segment_ids[0, 6:] = 1
        segment_ids[1, 5:] = 1
        segment_ids[1, 9:] = 2
        segment_ids[2, 5:] = 1
        segment_ids[2, 11:] = 2  # padding segment
        # Megatron convention: the last position of a segment predicts the next segment's
        # first token, so it is never trained.
        for i in range(b):
            for t in range(s - 1):
                if segment_ids[i, t] != segment_ids[i, t + 1]:
                    loss_mask[i, t] = 0
    return logits, tokens, labels, loss_mask, segment_ids


def _production(logits, labels, loss_mask, cfg, segment_ids):
    # The package's log-prob path is the output layer fused with the log-softmax: with the
    # identity as "output weight", its inputs are the logits themselves (gradients included).
    v = logits.shape[-1]
    eye = torch.eye(v, dtype=logits.dtype)
    logps = linear_label_logprobs(logits.reshape(-1, v), eye, labels.reshape(-1)).reshape(labels.shape)
    groups = Groups.build(loss_mask, segment_ids)
    terms = ift_loss_terms(logps, loss_mask, cfg, groups)
    return terms.loss / terms.count.clamp(min=1), terms


OPTIONS = list(
    itertools.product(
        ["loss", "logps", "mask"], ["L1", "L2", "softmax", "log"], ["left", "right"]
    )
)


@pytest.mark.parametrize("ptype,norm,side", OPTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("packed", [False, True])
def test_loss_and_grad_match_reference_float64(ptype, norm, side, gamma, packed):
    logits, _, labels, loss_mask, seg = _batch(packed=packed, seed=OPTIONS.index((ptype, norm, side)))
    for aggregation, detach in [("sample_mean", False), ("token_mean", True)]:
        cfg = IFTConfig(
            gamma=gamma, propagation_type=ptype, propagation_norm=norm, propagation_side=side,
            aggregation=aggregation, detach_weights=detach,
        )
        x1 = logits.clone().requires_grad_(True)
        x2 = logits.clone().requires_grad_(True)
        ref_loss, ref_metrics = reference.ift_loss(x1, labels, loss_mask, cfg, segment_ids=seg)
        loss, terms = _production(x2, labels, loss_mask, cfg, seg)
        ref_loss.backward()
        loss.backward()
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
        mixed = float(terms.mixed_sft / terms.count.clamp(min=1))
        assert mixed == pytest.approx(ref_metrics["loss_mixed_sft"], rel=1e-6, abs=1e-9)
        assert float(terms.weight_max) == pytest.approx(ref_metrics["weight_max"], rel=1e-6)
        ent = float(terms.weight_entropy / terms.num_samples)
        assert ent == pytest.approx(ref_metrics["weight_entropy"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("side", ["left", "right"])
def test_float32_within_relative_1e5(side):
    logits, _, labels, loss_mask, seg = _batch(dtype=torch.float32, packed=True, s=40)
    cfg = IFTConfig(propagation_side=side)
    x1 = logits.double().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ref_loss, _ = reference.ift_loss(x1, labels, loss_mask, cfg, segment_ids=seg)
    loss, _ = _production(x2, labels, loss_mask, cfg, seg)
    ref_loss.backward()
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x2.grad.double(), x1.grad, rtol=1e-5, atol=1e-6)


def test_long_sequence_crosses_scan_chunks():
    """Sequences longer than the blocked scan's chunk, with segments straddling chunk edges."""
    logits, _, labels, loss_mask, _ = _batch(b=2, s=300, v=7, seed=3)
    loss_mask[:, 10:-1] = 1
    seg = torch.zeros(2, 300, dtype=torch.long)
    seg[0, 120:] = 1
    seg[0, 131:] = 2  # a segment that spans the 128 boundary
    seg[1, 250:] = 1
    for i in range(2):
        for t in range(299):
            if seg[i, t] != seg[i, t + 1]:
                loss_mask[i, t] = 0
    cfg = IFTConfig(gamma=0.9)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ref_loss, _ = reference.ift_loss(x1, labels, loss_mask, cfg, segment_ids=seg)
    loss, _ = _production(x2, labels, loss_mask, cfg, seg)
    ref_loss.backward()
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-9, atol=1e-9)


def test_all_prompt_batch_gives_zero_loss_not_nan():
    logits, _, labels, _, _ = _batch()
    loss_mask = torch.zeros(labels.shape, dtype=torch.long)
    x = logits.clone().requires_grad_(True)
    loss, terms = _production(x, labels, loss_mask, IFTConfig(), None)
    loss.backward()
    assert float(loss) == 0.0 and float(terms.count) == 0.0
    assert torch.all(x.grad == 0)


def test_gamma0_weights_are_uniform_and_loss_is_cross_entropy():
    logits, _, labels, loss_mask, _ = _batch()
    cfg = IFTConfig(gamma=0.0, aggregation="token_mean")
    loss, _ = _production(logits, labels, loss_mask, cfg, None)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    expected = (ce * loss_mask.reshape(-1)).sum() / loss_mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator,k", [("greedy", 1), ("kth", 2), ("kth", 3)])
@pytest.mark.parametrize("packed", [False, True])
def test_estimated_sequence_matches_reference(estimator, k, packed):
    logits, tokens, _, loss_mask, seg = _batch(packed=packed, v=6)
    logits = torch.round(logits)  # many exact ties: ties go to the lowest id
    cfg = IFTConfig(estimator=estimator, k=k if estimator == "kth" else 2)
    ids = estimate(logits, cfg, vocab_size=logits.shape[-1])
    xhat = estimated_sequence(tokens, ids, loss_mask, seg)
    expected = reference.estimated_tokens(logits, tokens, loss_mask, cfg, segment_ids=seg)
    assert torch.equal(xhat, expected)
    # prompt tokens and segment starts are never replaced
    assert torch.equal(xhat[:, 0], tokens[:, 0])


@pytest.mark.parametrize("cfg", [
    IFTConfig(estimator="sample", temperature=0.7, seed=5),
    IFTConfig(estimator="top_p", top_p=0.8, temperature=1.3, seed=5),
], ids=["sample", "top_p"])
@pytest.mark.parametrize("packed", [False, True])
def test_sampled_sequence_matches_reference(cfg, packed):
    """Sampling estimators equal the reference's sort-based nucleus and Gumbel-max, token for
    token, with the noise keyed on global sample ids (rows 7, 8, 9) and step 4."""
    logits, tokens, _, loss_mask, seg = _batch(packed=packed, v=9, seed=3)
    sample_ids = torch.tensor([7, 8, 9])
    ids = estimate(logits, cfg, vocab_size=logits.shape[-1], step=4, sample_ids=sample_ids)
    xhat = estimated_sequence(tokens, ids, loss_mask, seg)
    expected = reference.estimated_tokens(logits, tokens, loss_mask, cfg, 4, segment_ids=seg,
                                          sample_ids=sample_ids)
    assert torch.equal(xhat, expected)
    assert not torch.equal(xhat, tokens)  # estimates replaced answer tokens


def test_padded_vocab_never_chosen():
    logits = torch.zeros(2, 5, 16)
    logits[..., 12:] = 100.0  # padding columns are the largest
    ids = estimate(logits, IFTConfig(), vocab_size=12)
    assert int(ids.max()) < 12
    ids = estimate(logits, IFTConfig(estimator="sample", temperature=1.0), vocab_size=12)
    assert int(ids.max()) < 12
    ids = estimate(logits, IFTConfig(estimator="top_p", top_p=0.5), vocab_size=12)
    assert int(ids.max()) < 12


def test_sampling_follows_softmax_and_nucleus():
    torch.manual_seed(0)
    v = 8
    row = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    logits = row.expand(1, 4000, v).clone()  # 4000 positions, independent noise per position
    cfg = IFTConfig(estimator="sample", temperature=1.0)
    ids = estimate(logits, cfg, vocab_size=v, step=3)
    freq = torch.bincount(ids.reshape(-1), minlength=v).double() / ids.numel()
    torch.testing.assert_close(freq, torch.softmax(row.double(), 0), atol=0.03, rtol=0)
    # nucleus p = 0.7 keeps the smallest top set with mass >= 0.7
    probs = torch.softmax(row.double(), 0)
    keep = int((torch.cumsum(probs, 0) < 0.7).sum()) + 1
    ids = estimate(logits, IFTConfig(estimator="top_p", top_p=0.7, temperature=1.0), vocab_size=v)
    assert int(ids.max()) < keep
    freq = torch.bincount(ids.reshape(-1), minlength=v).double() / ids.numel()
    torch.testing.assert_close(freq[:keep], probs[:keep] / probs[:keep].sum(), atol=0.03, rtol=0)
    # same key -> same draw; another step -> another draw
    again = estimate(logits, cfg, vocab_size=v, step=3)
    other = estimate(logits, cfg, vocab_size=v, step=4)
    assert torch.equal(estimate(logits, cfg, vocab_size=v, step=3), again)
    assert not torch.equal(again, other)


@pytest.mark.parametrize("estimator", ["greedy", "kth", "sample", "top_p"])
def test_per_entry_keys_give_the_same_draws_as_the_batch_layout(estimator):
    """The estimation pass passes only selected entries with their (sample, position) keys:
    every estimator must return what it returns for those entries in the full [b, s] layout."""
    g = torch.Generator().manual_seed(1)
    b, s, v = 3, 1500, 40  # > one sampling chunk of entries
    logits = torch.randn(b, s, v, generator=g) * 2
    sample_ids = torch.tensor([7, 3, 11])
    opts = {"kth": dict(k=3), "sample": dict(temperature=0.8), "top_p": dict(temperature=0.8, top_p=0.8)}
    cfg = IFTConfig(estimator=estimator, **opts.get(estimator, {}))
    full = estimate(logits, cfg, vocab_size=37, step=5, sample_ids=sample_ids)
    mask = torch.rand(b, s, generator=g) < 0.6
    rows, cols = mask.nonzero(as_tuple=True)
    picked = estimate(logits[rows, cols][None], cfg, vocab_size=37, step=5,
                      sample_ids=sample_ids[rows][None], positions=cols[None])
    assert picked.shape == (1, rows.numel())
    assert torch.equal(picked[0], full[rows, cols])


def test_vocabulary_mismatch_is_refused():
    from megatron_ift.ift import check_labels

    labels = torch.tensor([[1, 2, 70]])
    with pytest.raises(ValueError, match="tokenizer does not match the model"):
        check_labels(labels, torch.tensor([[1, 1, 1]]), vocab_size=64)
    check_labels(labels, torch.tensor([[1, 1, 0]]), vocab_size=64)  # untrained position: fine
    with pytest.raises(ValueError, match="exceeds the logits' vocabulary"):
        estimate(torch.zeros(1, 3, 32), IFTConfig(), vocab_size=40)


def test_mix_embeddings_live_and_detached():
    from megatron_ift.ift import mix_embeddings

    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 8)
    x = torch.randint(0, 20, (3, 7))
    xhat = torch.randint(0, 20, (3, 7))
    expected = 0.7 * table.weight[x] + 0.3 * table.weight[xhat]

    out = mix_embeddings(table(x), table(xhat), 0.3, "live")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.sum().backward()
    counts = torch.bincount(torch.cat([x.reshape(-1), xhat.reshape(-1)]), minlength=20)
    assert torch.equal(table.weight.grad.abs().sum(1) > 0, counts > 0)  # both terms reach the table

    detached = mix_embeddings(table(x), table(xhat), 0.3, "detached")
    torch.testing.assert_close(detached, expected, rtol=0, atol=1e-6)
    assert not detached.requires_grad
    plain = table(x)
    assert mix_embeddings(plain, None, 0.0, "live") is plain  # lambda 0: the lookup itself (SFT)
    with pytest.raises(ValueError, match="estimated tokens"):
        mix_embeddings(plain, None, 0.3, "live")
    with pytest.raises(ValueError, match="not 'live' or 'detached'"):
        mix_embeddings(plain, plain, 0.3, "frozen")
