"""The Transformer Engine stand-in (tests/_infra/te_standin) against plain PyTorch, and the rules
it must enforce as TE does (a call TE would reject fails here too).

The stand-in is imported for this module only and removed from ``sys.modules`` afterwards, so
the rest of the suite still sees a machine without Transformer Engine.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from _infra.te import STANDIN


@pytest.fixture(scope="module")
def te():
    sys.path.insert(0, STANDIN)
    try:
        yield importlib.import_module("transformer_engine.pytorch")
    finally:
        sys.path.remove(STANDIN)
        for name in [n for n in sys.modules if n.split(".")[0] == "transformer_engine"]:
            del sys.modules[name]


def _rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_it_reports_itself_as_the_stand_in(te):
    root = sys.modules["transformer_engine"]
    assert root.STANDIN is True and root.__version__ == "2.8.0"
    from importlib.metadata import version
    assert version("transformer_engine") == "2.8.0"  # megatron-core reads the dist-info


def test_layernorm_linear_is_the_norm_then_the_linear(te):
    torch.manual_seed(0)
    m = te.LayerNormLinear(32, 16, eps=1e-5, normalization="RMSNorm", bias=False, device="cpu",
                           params_dtype=torch.float32)
    with torch.no_grad():
        m.layer_norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref, g_ref = m.weight.detach().clone().requires_grad_(), m.layer_norm_weight.detach().clone().requires_grad_()
    out, ref = m(x), F.linear(_rmsnorm(x_ref, g_ref, 1e-5), w_ref)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for got, want in ((x.grad, x_ref.grad), (m.weight.grad, w_ref.grad), (m.layer_norm_weight.grad, g_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_wgrad_accumulates_into_main_grad(te):
    m = te.Linear(8, 4, bias=False, fuse_wgrad_accumulation=True, device="cpu", params_dtype=torch.float32)
    m.weight.main_grad = torch.ones(4, 8)
    x = torch.randn(3, 8)
    m(x).sum().backward()
    torch.testing.assert_close(m.weight.main_grad, 1 + torch.ones(3, 4).t() @ x)
    bare = te.Linear(8, 4, bias=False, fuse_wgrad_accumulation=True, device="cpu")
    with pytest.raises(RuntimeError, match="main_grad"):
        bare(x).sum().backward()


def _dpa(te, fmt="thd"):
    return te.DotProductAttention(4, 8, num_gqa_groups=2, qkv_format=fmt, attn_mask_type="padding_causal")


def test_thd_attention_is_causal_attention_per_sequence(te):
    torch.manual_seed(0)
    lengths = [5, 7, 4]
    t = sum(lengths)
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    out = _dpa(te)(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    want = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].permute(1, 0, 2)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        want.append(o[0].permute(1, 0, 2).reshape(b - a, 32))
    torch.testing.assert_close(out, torch.cat(want), rtol=1e-5, atol=1e-6)


def test_thd_attention_refuses_what_te_refuses(te):
    q, k = torch.randn(16, 4, 8), torch.randn(16, 2, 8)
    cu = torch.tensor([0, 5, 16])
    with pytest.raises(TypeError, match="int32"):
        _dpa(te)(q, k, k, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11)
    with pytest.raises(ValueError, match="max_seqlen"):
        _dpa(te)(q, k, k, cu_seqlens_q=cu.int(), cu_seqlens_kv=cu.int())
    with pytest.raises(ValueError, match="heads"):
        _dpa(te)(q, q, q, cu_seqlens_q=cu.int(), cu_seqlens_kv=cu.int(), max_seqlen_q=11, max_seqlen_kv=11)
    with pytest.raises(TypeError, match="unexpected keyword"):
        te.DotProductAttention(4, 8, no_such_option=True)


def _thd_cp_rank(te, monkeypatch, q, k, v, cu, rank, cp, comm="p2p"):
    """Rank ``rank`` of a CP group of ``cp`` in one process: the all-gather returns every rank's
    share (TE's split of each sequence), as the collective would."""
    from transformer_engine.pytorch.attention import dot_product_attention as dpa
    from transformer_engine.pytorch.attention.rope import thd_positions

    def share(x, r):
        seq, pos = thd_positions(cu, x.shape[0] // cp, cp, r)
        return x[cu.long()[seq] + pos]

    calls = iter((k, v))  # the attention gathers keys, then values

    class Gather:
        @staticmethod
        def apply(x, group):
            whole = next(calls)
            return torch.cat([share(whole, r) for r in range(cp)])  # rank order

    attn = _dpa(te)
    attn.cp_size, attn.cp_group, attn.cp_comm_type = cp, object(), comm
    monkeypatch.setattr(dpa, "_GatherSeq", Gather)
    monkeypatch.setattr(dpa.dist, "get_rank", lambda group=None: rank)
    out = attn(share(q, rank), share(k, rank), share(v, rank), cu_seqlens_q=cu, cu_seqlens_kv=cu,
               cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu, max_seqlen_q=8, max_seqlen_kv=8)
    return out, share


def test_thd_attention_with_context_parallelism_is_the_same_attention(te, monkeypatch):
    """TE's THD CP layout: rank r holds chunks r and 2cp-1-r of every sequence; its output is the
    CP 1 output at those tokens."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 12, 16, 24], dtype=torch.int32)
    q, k, v = torch.randn(24, 4, 8), torch.randn(24, 2, 8), torch.randn(24, 2, 8)
    whole = _dpa(te)(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    for rank in range(2):
        out, share = _thd_cp_rank(te, monkeypatch, q, k, v, cu, rank, 2)
        torch.testing.assert_close(out, share(whole, rank), rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="thd format is not supported"):
        _thd_cp_rank(te, monkeypatch, q, k, v, cu, 0, 2, comm="all_gather")
    odd = torch.tensor([0, 6, 12, 16, 24], dtype=torch.int32)  # 6 does not split into 4 chunks
    with pytest.raises(RuntimeError, match="multiple of 2 x cp_size = 4"):
        _thd_cp_rank(te, monkeypatch, q, k, v, odd, 0, 2)


def test_thd_attention_ignores_padding_between_sequences(te):
    """``cu_seqlens_*_padded`` lay the tokens out, ``cu_seqlens_*`` say which are real: a padded
    sequence's real tokens attend as the unpadded sequence; padding outputs 0."""
    torch.manual_seed(0)
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu, padded = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 12], dtype=torch.int32)
    out = _dpa(te)(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
                   cu_seqlens_kv_padded=padded, max_seqlen_q=8, max_seqlen_kv=8)
    real = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8])
    want = _dpa(te)(q[real], k[real], v[real], cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5,
                    max_seqlen_kv=5)
    torch.testing.assert_close(out[real], want, rtol=1e-5, atol=1e-6)
    assert not out[[3, 9, 10, 11]].any()


def test_thd_rope_with_context_parallelism_is_megatron_cores(te):
    """TE's fused THD RoPE under CP (``cu_seqlens`` of the whole sequences, the rank's tokens)
    against megatron-core's unfused reference of the same contract."""
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_thd,
    )
    from transformer_engine.pytorch.attention.rope import (
        apply_rotary_pos_emb,
        thd_positions,
    )

    class Group:  # what megatron-core reads from the CP group
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 12, 16, 24], dtype=torch.int32)
    freqs = torch.randn(10, 1, 1, 8)  # max_seqlen 10 != 24 tokens: positions from each sequence's start
    t = torch.randn(24, 2, 8)
    for cp in (1, 2):
        for rank in range(cp):
            seq, pos = thd_positions(cu, 24 // cp, cp, rank)
            mine = t[cu.long()[seq] + pos]
            got = apply_rotary_pos_emb(mine, freqs, tensor_format="thd", fused=True, cu_seqlens=cu,
                                       cp_size=cp, cp_rank=rank)
            want = _apply_rotary_pos_emb_thd(mine, cu, freqs, cp_group=Group(rank, cp))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.fixture
def hopper(monkeypatch):
    """FP8 autocast asks for a CUDA device of capability >= 8.9."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_linear_is_a_bounded_quantisation(te, hopper, recipe):
    from transformer_engine.common import recipe as recipes

    r = recipes.DelayedScaling(amax_history_len=4) if recipe == "delayed" else recipes.Float8CurrentScaling()
    torch.manual_seed(0)
    m = te.Linear(64, 32, bias=False, device="cpu", params_dtype=torch.float32)
    x = torch.randn(16, 64)
    exact = m(x)
    for _ in range(2):  # delayed scaling: the first step runs on scale 1, the second on the history
        with te.fp8_autocast(enabled=True, fp8_recipe=r):
            out = m(x)
    err = ((out - exact).norm() / exact.norm()).item()
    assert 0 < err < 0.1  # E4M3 keeps 3 mantissa bits: a few per cent, never exact
    with pytest.raises(AssertionError, match="divisible"):
        with te.fp8_autocast(enabled=True, fp8_recipe=r):
            m(torch.randn(5, 64))  # 5 tokens: not a multiple of 8


def test_fp8_needs_a_capable_device(te, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    with pytest.raises(AssertionError, match="8.9"):
        with te.fp8_autocast(enabled=True):
            pass


def test_fused_adam_is_adamw_with_te_state_contract(te):
    from transformer_engine.pytorch.optimizers import FusedAdam

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    b.data.copy_(a.data)
    fused = FusedAdam([a], lr=0.1, weight_decay=0.01, adam_w_mode=True)
    ref = torch.optim.AdamW([b], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(6, 4)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
    torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-6)
    state = fused.state_dict()
    assert state["param_groups"][0]["step"] == 3 and set(state["state"][0]) == {"exp_avg", "exp_avg_sq"}
    fused.state[a]["step"] = torch.tensor(3.0)  # what torch's Adam keeps, and a naive restore adds
    with pytest.raises(KeyError, match="step"):
        fused.state_dict()


def test_uncovered_features_are_refused_not_ignored(te):
    from transformer_engine.common import recipe as recipes

    with pytest.raises(NotImplementedError):
        te.Linear(8, 8, ub_overlap_ag=True, device="cpu")
    with pytest.raises(NotImplementedError):
        te.GroupedLinear(2, 8, 8)
    with pytest.raises(NotImplementedError):
        with te.fp8_autocast(enabled=False, fp8_recipe=recipes.MXFP8BlockScaling()):
            pass
