"""mechanisms/sigmoid_attention.py against the paper's formula, pair by pair, and its defining differences.

The oracle is written here: for each batch element, head, query i and key j, w_ij = sigmoid(q_i . k_j /
sqrt(Dh) - log(Tk)) if the pair is visible, else 0; out_i = sum_j w_ij v_j, then the output projection.
"""
import math

import pytest
import torch

from mechanisms.sigmoid_attention import SigmoidAttention
from tests.oracles import random_inputs, randomize_, torch_mha_like

FP64_TOL = 1e-10
D, H = 8, 2


def _model(d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(SigmoidAttention(d_model, num_heads, **kwargs).double().eval())


def _inputs(b=2, tq=4, tk=6, seed=1):
    return random_inputs(b, (tq, tk, tk), D, seed=seed)


def _loop(model, query, key, value, visible, b=None):
    batch, tq, tk = query.size(0), query.size(1), key.size(1)
    dh = model.head_dim
    bias = -math.log(tk) if b is None else b
    q, k, v = model.q_proj(query), model.k_proj(key), model.v_proj(value)
    heads = torch.zeros(batch, tq, D, dtype=torch.float64)
    weights = torch.zeros(batch, H, tq, tk, dtype=torch.float64)
    for bi in range(batch):
        for h in range(H):
            cols = slice(h * dh, (h + 1) * dh)
            for i in range(tq):
                for j in range(tk):
                    if visible(bi, h, i, j):
                        w = 1.0 / (1.0 + math.exp(-(float(q[bi, i, cols] @ k[bi, j, cols]) / math.sqrt(dh) + bias)))
                        weights[bi, h, i, j] = w
                        heads[bi, i, cols] += w * v[bi, j, cols]
    return model.out_proj(heads), weights


@torch.no_grad()
def test_matches_the_formula_pair_by_pair_with_masks():
    model = _model()
    q, k, v = _inputs()
    mask = torch.rand(2, H, 4, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    padding = torch.tensor([[True] * 6, [True, True, False, True, True, False]])
    cases = [
        ({}, lambda b, h, i, j: True),
        ({"mask": mask}, lambda b, h, i, j: bool(mask[b, h, i, j])),
        ({"key_padding_mask": padding}, lambda b, h, i, j: bool(padding[b, j])),
        ({"is_causal": True}, lambda b, h, i, j: j <= i + 2),  # bottom-right: Tk - Tq = 2
        ({"mask": mask, "key_padding_mask": padding, "is_causal": True},
         lambda b, h, i, j: bool(mask[b, h, i, j]) and bool(padding[b, j]) and j <= i + 2),
    ]
    for kwargs, visible in cases:
        out, weights = model(q, k, v, need_weights=True, **kwargs)
        expected, expected_w = _loop(model, q, k, v, visible)
        assert (out - expected).abs().max() < FP64_TOL, kwargs
        assert (weights - expected_w).abs().max() < FP64_TOL, kwargs
        assert (model(q, k, v, **kwargs) - expected).abs().max() < FP64_TOL, kwargs


@torch.no_grad()
def test_rows_are_not_normalised():
    # With zero queries every score is 0, so every weight is sigmoid(-log n) = 1 / (n + 1) exactly:
    # the paper's bias puts each weight at the size of a uniform softmax weight, but the row sums to n / (n + 1).
    model = _model()
    model.q_proj.weight.zero_()
    model.q_proj.bias.zero_()
    q, k, v = _inputs(tk=6)
    _, weights = model(q, k, v, need_weights=True)
    assert (weights - 1 / 7).abs().max() < 1e-15
    assert (weights.sum(-1) - 6 / 7).abs().max() < 1e-14
    # With random weights the row sums vary from row to row: each weight is on its own.
    _, weights = _model()(q, k, v, need_weights=True)
    sums = weights.sum(-1)
    assert sums.max() - sums.min() > 0.1 and (sums - 1).abs().max() > 0.1


@torch.no_grad()
def test_masked_entries_contribute_exactly_zero():
    model = _model()
    q, k, v = _inputs()
    mask = torch.tensor([True, False, True, True, False, True])[None, None, None, :]
    out, weights = model(q, k, v, mask=mask, need_weights=True)
    assert (weights[..., [1, 4]] == 0).all() and (weights[..., [0, 2, 3, 5]] > 0).all()
    # ...which is NOT the same as dropping those keys: b = -log(Tk) still counts them (documented on the page).
    k2, v2 = k[:, [0, 2, 3, 5]], v[:, [0, 2, 3, 5]]
    assert (model(q, k2, v2) - out).abs().max() > 1e-3
    fixed = _model(attn_bias=-math.log(6))
    assert (fixed(q, k2, v2) - out).abs().max() < FP64_TOL  # with b fixed, masking = removing the keys


@torch.no_grad()
def test_distinct_from_softmax_attention_with_the_same_weights():
    model = _model()
    ref = torch_mha_like(model)
    q, k, v = _inputs()
    assert (model(q, k, v) - ref(q, k, v)[0]).abs().max() > 1e-2


@torch.no_grad()
def test_every_constructor_argument_changes_the_output():
    base = _model()
    q, k, v = _inputs()
    out = base(q, k, v)
    two = _model(num_heads=4)
    two.load_state_dict(base.state_dict())
    assert (two(q, k, v) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(q, k, v) - out).abs().max() > 1e-3, "bias"
    fixed = _model(attn_bias=0.0)
    assert (fixed(q, k, v) - out).abs().max() > 1e-3, "attn_bias"
    expected, _ = _loop(base, q, k, v, lambda b, h, i, j: True, b=0.0)
    assert (fixed(q, k, v) - expected).abs().max() < FP64_TOL, "attn_bias is the b of the formula"
    dropped = _model(dropout=0.5).train()
    assert (dropped(q, k, v) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=4, num_heads=2)(q[..., :4]).shape == (2, 4, 4), "d_model"
    with pytest.raises(ValueError, match="attn_bias"):
        SigmoidAttention(D, H, attn_bias=float("inf"))
