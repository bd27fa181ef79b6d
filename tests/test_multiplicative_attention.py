"""Tests for mechanisms/multiplicative_attention.py (Luong et al. 2015).

Oracles: dot = softmax(q k^T) v written out (and PyTorch's SDPA with scale 1); general with W_a = I
equals dot; concat and local-p = explicit loops over (batch, query, key) of the paper's formulas;
local-p with a huge window equals global.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mechanisms.multiplicative_attention import LuongAttention

TOL64 = 1e-10  # float64 comparisons: only the order of summation differs
CONFIGS = [(s, a) for s in ("dot", "general", "concat") for a in ("global", "local-p")]


def _module(score="dot", alignment="global", D=4, Dk=None, window=2, bias=None, hidden_dim=None, seed=0):
    torch.manual_seed(seed)
    if bias is None:
        bias = score != "dot"
    attn = LuongAttention(D, key_dim=Dk, score=score, hidden_dim=hidden_dim, alignment=alignment,
                          window=window if alignment == "local-p" else None, bias=bias).double()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("bias"):
                p.normal_()  # a bias far from zero, so a test would notice it missing
    return attn


def _data(B=2, Tq=3, Tk=7, Dq=4, Dk=4, Dv=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Tq, Dq, generator=g, dtype=torch.float64),
            torch.randn(B, Tk, Dk, generator=g, dtype=torch.float64),
            torch.randn(B, Tk, Dv, generator=g, dtype=torch.float64))


def _pad_mask(B=2, Tk=7, lengths=(7, 4)):
    mask = torch.zeros(B, 1, 1, Tk, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, ..., :n] = True
    return mask


def _score_loop(attn, h_t, h_s):
    """The paper's score for one query vector and one key vector."""
    if attn.score == "dot":
        return float(h_t @ h_s)
    if attn.score == "general":
        W, b = attn.query_proj.weight, attn.query_proj.bias
        return float((W @ h_t + (b if b is not None else 0)) @ h_s)
    W_q, b, W_k, v = (attn.query_proj.weight, attn.query_proj.bias, attn.key_proj.weight,
                      attn.score_proj.weight[0])
    return float(v @ torch.tanh(W_q @ h_t + (b if b is not None else 0) + W_k @ h_s))


def _loop_oracle(attn, query, key, value, mask=None):
    """Loop over (batch, query, key): global softmax, or local-p's window softmax times the Gaussian."""
    B, Tq, Tk = query.shape[0], query.shape[1], key.shape[1]
    context = torch.zeros(B, Tq, value.shape[-1], dtype=torch.float64)
    weights = torch.zeros(B, 1, Tq, Tk, dtype=torch.float64)
    with torch.no_grad():
        for b in range(B):
            for i in range(Tq):
                allowed = [j for j in range(Tk) if mask is None or bool(mask[b, 0, 0, j])]
                if attn.alignment == "local-p":
                    S = len(allowed)  # the row's source length
                    W_p, v_p = attn.position_proj.weight, attn.position_score.weight[0]
                    p = S / (1 + math.exp(-float(v_p @ torch.tanh(W_p @ query[b, i]))))
                    allowed = [j for j in allowed if abs(j - p) <= attn.window]
                if not allowed:
                    continue
                e = [_score_loop(attn, query[b, i], key[b, j]) for j in allowed]
                m = max(e)
                z = sum(math.exp(x - m) for x in e)
                for n, j in enumerate(allowed):
                    a = math.exp(e[n] - m) / z
                    if attn.alignment == "local-p":
                        sigma = attn.window / 2
                        a *= math.exp(-((j - p) ** 2) / (2 * sigma ** 2))
                    weights[b, 0, i, j] = a
                    context[b, i] += a * value[b, j]
    return context, weights


def test_dot_equals_unscaled_softmax_and_sdpa_with_scale_1():
    attn = _module("dot")
    q, k, v = _data()
    explicit = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    sdpa = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(1)
    fused = attn(q, k, v)
    slow, _ = attn(q, k, v, need_weights=True)
    for out in (fused, slow):
        assert torch.allclose(out, explicit, atol=TOL64, rtol=0)
        assert torch.allclose(out, sdpa, atol=TOL64, rtol=0)


def test_general_with_identity_equals_dot():
    q, k, v = _data()
    general = _module("general", bias=False)
    with torch.no_grad():
        general.query_proj.weight.copy_(torch.eye(4, dtype=torch.float64))
    dot = _module("dot")
    mask = _pad_mask()
    for nw in (False, True):
        a = general(q, k, v, mask=mask, need_weights=nw)
        b = dot(q, k, v, mask=mask, need_weights=nw)
        a, b = (a[0], b[0]) if nw else (a, b)
        assert torch.allclose(a, b, atol=TOL64, rtol=0)


@pytest.mark.parametrize("score,alignment", CONFIGS)
def test_matches_explicit_loop(score, alignment):
    Dk = 4 if score == "dot" else 3  # general and concat accept a key width different from the query's
    attn = _module(score, alignment, Dk=Dk, window=2)
    q, k, v = _data(Dk=Dk)
    for mask in (None, _pad_mask()):
        out, w = attn(q, k, v, mask=mask, need_weights=True)
        ref_out, ref_w = _loop_oracle(attn, q, k, v, mask)
        assert torch.allclose(w, ref_w, atol=TOL64, rtol=0), f"weights differ from the loop by > {TOL64}"
        assert torch.allclose(out, ref_out, atol=TOL64, rtol=0), f"context differs from the loop by > {TOL64}"


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_local_p_with_a_huge_window_equals_global(score):
    q, k, v = _data()
    glob = _module(score, "global")
    local = _module(score, "local-p", window=10 ** 6)  # sigma = D / 2 = 5e5: the Gaussian is 1 - 1e-10
    local.load_state_dict(glob.state_dict(), strict=False)
    mask = _pad_mask()
    out_g, w_g = glob(q, k, v, mask=mask, need_weights=True)
    out_l, w_l = local(q, k, v, mask=mask, need_weights=True)
    assert torch.allclose(out_l, out_g, atol=1e-8, rtol=0)
    assert torch.allclose(w_l, w_g, atol=1e-8, rtol=0)


def test_local_p_weights_window_gaussian_and_sums():
    # The softmax inside the window sums to 1 on each row; the Gaussian then makes the returned
    # weights sum to less than 1, as in the paper. Outside [p_t - D, p_t + D] they are exactly 0.
    attn = _module("general", "local-p", window=2)
    q, k, v = _data(Tk=12)
    out, w = attn(q, k, v, need_weights=True)
    with torch.no_grad():
        p = 12 * torch.sigmoid(attn.position_score(torch.tanh(attn.position_proj(q))))  # (B, Tq, 1)
    s = torch.arange(12, dtype=torch.float64)
    inside = (s - p).abs() <= 2  # (B, Tq, Tk)
    gauss = torch.exp(-(s - p) ** 2 / (2 * 1.0 ** 2))  # sigma = D / 2 = 1
    w = w[:, 0]
    assert (w[~inside] == 0).all()
    assert (w[inside] > 0).all()
    softmax_part = (w / gauss).sum(-1)
    assert torch.allclose(softmax_part, torch.ones_like(softmax_part), atol=1e-12)
    assert (w.sum(-1) < 1).all()
    assert torch.allclose(out, w @ v, atol=TOL64), "the returned weights are the ones that mix the values"


def test_local_p_source_length_is_the_number_of_unmasked_keys():
    # A right-padded row must behave exactly like the same row without its padding.
    attn = _module("dot", "local-p", window=2)
    q, k, v = _data(B=1, Tk=9)
    padding = _pad_mask(B=1, Tk=9, lengths=(5,))[:, 0, 0, :]  # (B, Tk)
    padded = attn(q, k, v, key_padding_mask=padding)
    trimmed = attn(q, k[:, :5], v[:, :5])
    assert torch.allclose(padded, trimmed, atol=TOL64, rtol=0)


@pytest.mark.parametrize("score,alignment", CONFIGS)
def test_two_dim_mask_equals_the_same_mask_expanded_to_four_dims(score, alignment):
    # A (Tq, Tk) mask is shared by the whole batch: it must act exactly like that mask written out
    # as (B, 1, Tq, Tk), on the fused and the explicit path (local-p also counts S from it).
    attn = _module(score, alignment, window=3)
    q, k, v = _data()
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1],
                         [0, 0, 0, 0, 0, 0, 0],  # this query sees nothing
                         [0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)  # (Tq, Tk) = (3, 7)
    full = mask.expand(2, 1, 3, 7)  # (B, 1, Tq, Tk)
    for nw in (False, True):
        two, four = attn(q, k, v, mask=mask, need_weights=nw), attn(q, k, v, mask=full, need_weights=nw)
        two, four = (two, four) if nw else ((two,), (four,))
        for a, b in zip(two, four):
            assert torch.allclose(a, b, atol=TOL64, rtol=0)
        assert (two[0][:, 1] == 0).all()
        assert (two[0] - attn(q, k, v)).abs().max() > 1e-3, "the mask changed nothing"
        if nw:
            assert (two[1].masked_select(~full) == 0).all()


def test_dot_global_has_no_parameters():
    assert len(list(LuongAttention(4).parameters())) == 0


@pytest.mark.parametrize("score,alignment", CONFIGS)
def test_distinct_from_scaled_dot_product_attention(score, alignment):
    # Plain attention with the same query map: softmax(q k^T / sqrt(d)) v. Luong never scales,
    # concat is not bilinear and local-p adds a window and a Gaussian; all differ from it.
    attn = _module(score, alignment, window=2)
    q, k, v = _data()
    q_in = attn.query_proj(q) if score == "general" else q
    plain = torch.softmax(q_in @ k.transpose(1, 2) / math.sqrt(4), dim=-1) @ v
    assert (attn(q, k, v) - plain).abs().max() > 1e-3


def test_every_constructor_argument_changes_the_output():
    q, k, v = _data()
    outs = {}
    for score, alignment in CONFIGS:
        outs[score, alignment] = _module(score, alignment, window=2)(q, k, v)
    keys = list(outs)
    for i in range(len(keys)):  # score and alignment: all six configurations differ
        for j in range(i + 1, len(keys)):
            assert (outs[keys[i]] - outs[keys[j]]).abs().max() > 1e-6, f"{keys[i]} == {keys[j]}"
    # window: D = 1 and D = 3 with the same parameters
    w1, w3 = _module("dot", "local-p", window=1), _module("dot", "local-p", window=3)
    w3.load_state_dict(w1.state_dict())
    assert (w1(q, k, v) - w3(q, k, v)).abs().max() > 1e-6
    # hidden_dim of concat
    assert (_module("concat", hidden_dim=4)(q, k, v) - _module("concat", hidden_dim=6)(q, k, v)).abs().max() > 1e-6
    # bias of general and concat, with the weights shared
    for score in ("general", "concat"):
        with_b, without = _module(score, bias=True), _module(score, bias=False)
        without.load_state_dict(with_b.state_dict(), strict=False)
        assert (with_b(q, k, v) - without(q, k, v)).abs().max() > 1e-6, f"bias had no effect on {score}"
    # key_dim: general / concat accept a narrower key
    q3, k3, v3 = _data(Dk=3)
    assert _module("general", Dk=3)(q3, k3, v3).shape == (2, 3, 5)


@pytest.mark.parametrize("score,alignment", CONFIGS)
def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq(score, alignment):
    # B == Tq == 2: a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. As `key_padding_mask` row b
    # is batch element b's real keys (and, for local-p, its source length S); the loop oracle reads it so.
    attn = _module(score, alignment, window=2)
    q, k, v = _data(B=2, Tq=2)
    padding = _pad_mask(lengths=(7, 4))[:, 0, 0, :]  # (B, Tk)
    expected, _ = _loop_oracle(attn, q, k, v, padding[:, None, None, :])
    assert torch.allclose(attn(q, k, v, key_padding_mask=padding), expected, atol=TOL64, rtol=0)
    as_rows = attn(q, k, v, mask=padding)  # the (Tq, Tk) reading: query 1 sees 4 keys in BOTH batch elements
    assert (as_rows - expected).abs().max() > 1e-3, "the two readings should differ on this input"
