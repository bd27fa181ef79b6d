"""Tests for mechanisms/additive_attention.py (Bahdanau et al. 2014).

The oracle is the paper's formula evaluated one (batch, query, key) triple at a time in float64,
with its own softmax: nothing in it shares code with the module's broadcasting path.
"""

import math

import pytest
import torch

from mechanisms.additive_attention import AdditiveAttention

TOL64 = 1e-10  # float64: the loop and the broadcast differ only by summation order


def _module(Dq=5, Dk=3, Hd=6, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    attn = AdditiveAttention(Dq, Dk, Hd, bias=bias, dropout=dropout).double()
    if bias:
        with torch.no_grad():
            attn.query_proj.bias.normal_()  # make sure the bias is far from zero
    return attn


def _loop_oracle(attn, s, h, value, mask):
    """e_ij = v^T tanh(W_q s_i + b + W_k h_j); a = softmax over allowed j; c_i = sum_j a_ij value_j."""
    W_q, W_k, v = attn.query_proj.weight, attn.key_proj.weight, attn.score_proj.weight[0]
    b = attn.query_proj.bias if attn.query_proj.bias is not None else torch.zeros(W_q.shape[0], dtype=s.dtype)
    B, Tq, Tk = s.shape[0], s.shape[1], h.shape[1]
    context = torch.zeros(B, Tq, value.shape[-1], dtype=s.dtype)
    weights = torch.zeros(B, 1, Tq, Tk, dtype=s.dtype)
    with torch.no_grad():
        for bi in range(B):
            for i in range(Tq):
                allowed = [j for j in range(Tk) if mask is None or bool(mask[bi if mask.shape[0] > 1 else 0, 0,
                                                                              i if mask.shape[2] > 1 else 0, j])]
                if not allowed:
                    continue
                e = [float(v @ torch.tanh(W_q @ s[bi, i] + b + W_k @ h[bi, j])) for j in allowed]
                m = max(e)
                z = sum(math.exp(x - m) for x in e)
                for n, j in enumerate(allowed):
                    a = math.exp(e[n] - m) / z
                    weights[bi, 0, i, j] = a
                    context[bi, i] += a * value[bi, j]
    return context, weights


def test_matches_explicit_loop_of_the_paper_formula():
    attn = _module()
    B, Tq, Tk = 2, 4, 6  # query and key lengths differ, and so do their widths (5 vs 3)
    s, h = torch.randn(B, Tq, 5, dtype=torch.float64), torch.randn(B, Tk, 3, dtype=torch.float64)
    value = torch.randn(B, Tk, 7, dtype=torch.float64)
    mask = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    mask[0, ..., 4:] = False
    for m in (None, mask):
        context, weights = attn(s, h, value, mask=m, need_weights=True)
        ref_c, ref_w = _loop_oracle(attn, s, h, value, m)
        assert torch.allclose(context, ref_c, atol=TOL64, rtol=0), f"context differs from loop by > {TOL64}"
        assert torch.allclose(weights, ref_w, atol=TOL64, rtol=0), f"weights differ from loop by > {TOL64}"


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 5), (5, 1), (3, 8)])
def test_any_lengths_and_value_defaults_to_key(Tq, Tk):
    attn = _module()
    s, h = torch.randn(2, Tq, 5, dtype=torch.float64), torch.randn(2, Tk, 3, dtype=torch.float64)
    context, weights = attn(s, h, need_weights=True)
    assert context.shape == (2, Tq, 3) and weights.shape == (2, 1, Tq, Tk)
    ref_c, _ = _loop_oracle(attn, s, h, h, None)
    assert torch.allclose(context, ref_c, atol=TOL64, rtol=0)


def test_two_dim_mask_equals_the_same_mask_expanded_to_four_dims():
    # A (Tq, Tk) mask is shared by the whole batch: it must act exactly like that mask written out
    # as (B, 1, Tq, Tk), which the loop oracle reads entry by entry.
    attn = _module()
    s, h = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    value = torch.randn(2, 6, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1],
                         [0, 0, 0, 0, 0, 0],  # this query sees nothing
                         [0, 1, 1, 0, 1, 1]], dtype=torch.bool)  # (Tq, Tk) = (3, 6)
    full = mask.expand(2, 1, 3, 6)  # (B, 1, Tq, Tk)
    context, weights = attn(s, h, value, mask=mask, need_weights=True)
    context4, weights4 = attn(s, h, value, mask=full, need_weights=True)
    assert torch.allclose(context, context4, atol=TOL64, rtol=0)
    assert torch.allclose(weights, weights4, atol=TOL64, rtol=0)
    ref_c, ref_w = _loop_oracle(attn, s, h, value, full)
    assert torch.allclose(context, ref_c, atol=TOL64, rtol=0) and torch.allclose(weights, ref_w, atol=TOL64, rtol=0)
    assert (weights.masked_select(~full) == 0).all() and (context[:, 1] == 0).all()


def test_distinct_from_dot_product_attention_with_the_same_weights():
    # Plain single-head attention built from the same W_q (with its bias) and W_k: softmax(q k^T / sqrt(d)) v.
    attn = _module(Dq=4, Dk=4, Hd=4)
    s, h = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    q, k = attn.query_proj(s), attn.key_proj(h)
    plain = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4), dim=-1) @ h
    assert (attn(s, h) - plain).abs().max() > 1e-3


def test_hidden_dim_and_bias_change_the_output():
    s, h = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    base = _module(Hd=6)
    other = _module(Hd=7)
    assert (base(s, h) - other(s, h)).abs().max() > 1e-6
    no_bias = _module(Hd=6, bias=False)
    with torch.no_grad():
        no_bias.query_proj.weight.copy_(base.query_proj.weight)
        no_bias.key_proj.weight.copy_(base.key_proj.weight)
        no_bias.score_proj.weight.copy_(base.score_proj.weight)
    assert no_bias.query_proj.bias is None
    assert (base(s, h) - no_bias(s, h)).abs().max() > 1e-6


def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq():
    # B == Tq == 3: a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. As `key_padding_mask` row b
    # hides batch element b's padding from all its queries; as `mask` row i is query i's pattern.
    attn = _module()
    s, h = torch.randn(3, 3, 5, dtype=torch.float64), torch.randn(3, 6, 3, dtype=torch.float64)
    value = torch.randn(3, 6, 4, dtype=torch.float64)
    padding = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    per_batch, _ = _loop_oracle(attn, s, h, value, padding[:, None, None, :])
    per_query, _ = _loop_oracle(attn, s, h, value, padding[None, None, :, :])
    assert torch.allclose(attn(s, h, value, key_padding_mask=padding), per_batch, atol=TOL64, rtol=0)
    assert torch.allclose(attn(s, h, value, mask=padding), per_query, atol=TOL64, rtol=0)
    assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"
