"""Tests for mechanisms/alibi.py (ALiBi slopes, bias and attention).

Expected slopes are written by hand from the paper's rule (Press et al. 2021, section 3 and its
official code): for n a power of two the geometric sequence starting at 2^(-8/n) with ratio 2^(-8/n);
otherwise the n' = 2^floor(log2 n) slopes followed by every other slope (1st, 3rd, ...) of the 2n' sequence.
"""
import math

import pytest
import torch

from mechanisms.alibi import ALiBiAttention, alibi_bias, alibi_slopes

TOL64 = 1e-10  # float64, a whole attention layer


def p2(e):
    return 2.0 ** e


HAND_SLOPES = {
    1: [p2(-8)],
    2: [p2(-4), p2(-8)],
    3: [p2(-4), p2(-8), p2(-2)],
    4: [p2(-2), p2(-4), p2(-6), p2(-8)],
    6: [p2(-2), p2(-4), p2(-6), p2(-8), p2(-1), p2(-3)],
    8: [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256],
    12: [p2(-1), p2(-2), p2(-3), p2(-4), p2(-5), p2(-6), p2(-7), p2(-8),
         p2(-0.5), p2(-1.5), p2(-2.5), p2(-3.5)],
    16: [p2(-0.5 * h) for h in range(1, 17)],
}


@pytest.mark.parametrize("n", sorted(HAND_SLOPES))
def test_slopes_follow_the_paper(n):
    got = alibi_slopes(n)
    assert got.shape == (n,) and got.dtype == torch.float32
    expected = torch.tensor(HAND_SLOPES[n], dtype=torch.float32)
    assert torch.equal(got, expected), f"{n} heads: {got.tolist()}"


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_power_of_two_slopes_are_geometric_with_start_equal_ratio(n):
    s = alibi_slopes(n).double()
    start = 2.0 ** (-8.0 / n)
    assert abs(s[0].item() - start) < 1e-7
    assert (s[1:] / s[:-1] - start).abs().max() < 1e-6


def test_bias_values_and_shift_invariance_along_diagonals():
    H, T = 4, 7
    b = alibi_bias(H, T, T)
    m = HAND_SLOPES[4]
    assert b.shape == (H, T, T)
    for h in range(H):
        for i in range(T):
            for j in range(T):
                assert b[h, i, j].item() == pytest.approx(-m[h] * (i - j))
    # depends only on i - j: every diagonal is constant
    assert torch.equal(b[:, 1:, 1:], b[:, :-1, :-1])
    sym = alibi_bias(H, T, T, causal=False)
    assert torch.equal(sym, sym.transpose(-1, -2)) and (sym <= 0).all()
    assert torch.equal(sym[:, 1:, 1:], sym[:, :-1, :-1])


def test_bias_for_fewer_queries_is_the_last_rows():
    full = alibi_bias(6, 9, 9)
    assert torch.equal(alibi_bias(6, 2, 9), full[:, -2:])


def oracle(mod, query, key, slopes, causal, mask=None):
    """Explicit ALiBi attention from the formula, with the given slopes (a list)."""
    B, Tq, D = query.shape
    Tk = key.shape[1]
    H = mod.num_heads
    Dh = D // H
    q = mod.q_proj(query).view(B, Tq, H, Dh).transpose(1, 2)
    k = mod.k_proj(key).view(B, Tk, H, Dh).transpose(1, 2)
    v = mod.v_proj(key).view(B, Tk, H, Dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    allowed = torch.ones(B, H, Tq, Tk, dtype=torch.bool)
    for h in range(H):
        for i in range(Tq):
            pos_i = i + Tk - Tq
            for j in range(Tk):
                scores[:, h, i, j] -= slopes[h] * (pos_i - j if causal else abs(pos_i - j))
                if causal and j > pos_i:
                    allowed[:, h, i, j] = False
    if mask is not None:
        allowed = allowed & mask
    w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return mod.out_proj((w @ v).transpose(1, 2).reshape(B, Tq, D)), w


def make(d_model=12, num_heads=6, seed=0, **kw):
    torch.manual_seed(seed)
    return ALiBiAttention(d_model, num_heads, **kw)


# ------------------------------------------------------------------ oracle, limit case, distinct
@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_explicit_formula(causal):
    mod = make().double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    expected, expected_w = oracle(mod, x, x, HAND_SLOPES[6], causal)
    out, w = mod(x, is_causal=causal, need_weights=True)
    assert (mod(x, is_causal=causal) - expected).abs().max() < TOL64
    assert (out - expected).abs().max() < TOL64 and (w - expected_w).abs().max() < TOL64


def test_queries_are_the_last_keys_kv_cache():
    mod = make().double()
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    assert (mod(x[:, -3:], x) - mod(x)[:, -3:]).abs().max() < TOL64


def test_official_code_form_m_times_j_gives_the_same_causal_output():
    # eq. (5): -m(i - j) = m*j - m*i and the row constant -m*i cancels in the softmax
    mod = make().double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    B, T, D = x.shape
    H, Dh = 6, 2
    q = mod.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
    k = mod.k_proj(x).view(B, T, H, Dh).transpose(1, 2)
    v = mod.v_proj(x).view(B, T, H, Dh).transpose(1, 2)
    m = torch.tensor(HAND_SLOPES[6], dtype=torch.float64).view(H, 1, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh) + m * torch.arange(T, dtype=torch.float64)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    expected = mod.out_proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, D))
    assert (mod(x) - expected).abs().max() < TOL64


@pytest.mark.parametrize("causal", [True, False])
def test_zero_slopes_equal_plain_multi_head_attention(causal):
    mod = make().double()
    mod.slopes.zero_()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    plain, _ = oracle(mod, x, x, [0.0] * 6, causal)
    assert (mod(x, is_causal=causal) - plain).abs().max() < TOL64


def test_distinct_from_plain_multi_head_attention():
    mod = make().double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    plain, _ = oracle(mod, x, x, [0.0] * 6, True)
    assert (mod(x) - plain).abs().max() > 1e-3


# ------------------------------------------------------------------ masks


# ------------------------------------------------------------------ gradients, arguments, dropout, paths


def test_every_constructor_argument_changes_the_output():
    x = torch.randn(2, 6, 12)
    ref = make()
    base = ref(x)

    def variant(**kw):
        args = dict(d_model=12, num_heads=6, dropout=0.0, bias=True)
        args.update(kw)
        mod = ALiBiAttention(**args)
        mod.load_state_dict(ref.state_dict(), strict=False)
        return mod

    assert torch.equal(variant()(x), base)
    assert not torch.allclose(variant(num_heads=4)(x), base)
    assert not torch.allclose(variant(bias=False)(x), base)
    assert not torch.allclose(variant(dropout=0.5).train()(x), base)
    assert make(d_model=8, num_heads=2)(torch.randn(2, 6, 8)).shape == (2, 6, 8)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq(need_weights):
    # B == Tq == 2 (the last 2 of 6 tokens): a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. As
    # `key_padding_mask` row b is batch element b's real keys; as `mask` row i is query i's pattern.
    mod = make().double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    padding = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    per_batch, _ = oracle(mod, x[:, 4:], x, HAND_SLOPES[6], False, mask=padding[:, None, None, :])
    per_query, _ = oracle(mod, x[:, 4:], x, HAND_SLOPES[6], False, mask=padding)
    got = mod(x[:, 4:], x, x, key_padding_mask=padding, is_causal=False, need_weights=need_weights)
    got = got[0] if need_weights else got
    assert (got - per_batch).abs().max() < TOL64
    assert (mod(x[:, 4:], x, x, mask=padding, is_causal=False) - per_query).abs().max() < TOL64
    assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"


def test_more_queries_than_keys_and_zero_heads_are_refused():
    mod = make()
    with pytest.raises(ValueError, match="query"):
        mod(torch.randn(2, 6, 12), torch.randn(2, 5, 12))  # queries are the LAST Tq of the Tk keys
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)
