"""mechanisms/differential_attention.py against the paper's formula and its two limit cases.

The oracle is written here after the paper's reference code: the query/key projections viewed as 2H heads of
width d (head 2h is half 1 of differential head h, head 2h + 1 half 2), values as H heads of width 2d, two
softmax maps, their difference with lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init, an RMSNorm per head
with its learned scale, the factor (1 - lambda_init), and the output projection.
"""
import math

import pytest
import torch

from mechanisms.differential_attention import DifferentialAttention, lambda_init_schedule
from tests.oracles import random_inputs, randomize_, torch_mha_like

FP64_TOL = 1e-10
D, H = 16, 2  # head_dim d = 4, values 8 wide


def _model(d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(DifferentialAttention(d_model, num_heads, **kwargs).double().eval())


def _inputs(b=2, tq=4, tk=6, seed=1):
    return random_inputs(b, (tq, tk, tk), D, seed=seed)


def _formula(model, query, key, value, allowed=None, lam=None):
    b, tq, tk, h, d = query.size(0), query.size(1), key.size(1), model.num_heads, model.head_dim
    q = model.q_proj(query).view(b, tq, 2 * h, d).transpose(1, 2)
    k = model.k_proj(key).view(b, tk, 2 * h, d).transpose(1, 2)
    v = model.v_proj(value).view(b, tk, h, 2 * d).transpose(1, 2)
    s = q @ k.transpose(-2, -1) / math.sqrt(d)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    a = torch.softmax(s, dim=-1)
    if lam is None:
        lam = (math.exp(float(model.lambda_q1 @ model.lambda_k1)) - math.exp(float(model.lambda_q2 @ model.lambda_k2))
               + model.lambda_init)
    diff = a[:, 0::2] - lam * a[:, 1::2]  # (B, H, Tq, Tk)
    heads = diff @ v
    heads = heads / torch.sqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5) * model.norm.weight
    heads = heads * (1 - model.lambda_init)
    return model.out_proj(heads.transpose(1, 2).reshape(b, tq, D)), diff


@torch.no_grad()
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_the_formula_written_out(need_weights):
    model = _model(layer_index=2)
    q, k, v = _inputs()
    allowed = torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2)  # bottom-right causal
    for kwargs, mask in (({}, None), ({"is_causal": True}, allowed)):
        expected, expected_w = _formula(model, q, k, v, mask)
        result = model(q, k, v, need_weights=need_weights, **kwargs)
        out = result[0] if need_weights else result
        assert (out - expected).abs().max() < FP64_TOL, kwargs
        if need_weights:
            assert (result[1] - expected_w).abs().max() < FP64_TOL, kwargs
            lam = float(model.lambda_value())
            assert (result[1].sum(-1) - (1 - lam)).abs().max() < FP64_TOL  # rows sum to 1 - lambda


@torch.no_grad()
def test_lambda_zero_is_softmax_attention_up_to_the_normalisation():
    # lambda_init = 0 and equal lambda vector products make lambda = e^c - e^c + 0 = 0: only the first map is left.
    model = _model(lambda_init=0.0)
    model.lambda_q2.copy_(model.lambda_q1)
    model.lambda_k2.copy_(model.lambda_k1)
    assert float(model.lambda_value()) == 0.0
    q, k, v = _inputs()
    d = model.head_dim
    # Standard attention (PyTorch's kernel) with query/key heads of width d and value heads of width 2d...
    qh = model.q_proj(q).view(2, 4, 2 * H, d).transpose(1, 2)[:, 0::2]
    kh = model.k_proj(k).view(2, 6, 2 * H, d).transpose(1, 2)[:, 0::2]
    vh = model.v_proj(v).view(2, 6, H, 2 * d).transpose(1, 2)
    heads = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    # ...followed by the documented normalisation: RMSNorm per head with its learned scale, times (1 - 0).
    heads = heads / torch.sqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5) * model.norm.weight
    expected = model.out_proj(heads.transpose(1, 2).reshape(2, 4, D))
    assert (model(q, k, v) - expected).abs().max() < FP64_TOL


@torch.no_grad()
def test_identical_halves_with_lambda_one_cancel_exactly():
    model = _model(lambda_init=1.0)
    for p in (model.lambda_q1, model.lambda_k1, model.lambda_q2, model.lambda_k2):
        p.zero_()  # lambda = e^0 - e^0 + 1 = 1
    d = model.head_dim
    for proj in (model.q_proj, model.k_proj):  # half 2 of every head := half 1
        w, b = proj.weight.view(H, 2, d, D), proj.bias.view(H, 2, d)
        w[:, 1] = w[:, 0]
        b[:, 1] = b[:, 0]
    q, k, v = _inputs()
    out, weights = model(q, k, v, need_weights=True)
    assert weights.abs().max() < 1e-15  # the two maps are equal and cancel
    assert (out - model.out_proj.bias).abs().max() < 1e-12  # nothing reaches the output projection
    assert (model(q, k, v) - model.out_proj.bias).abs().max() < 1e-12  # fused path too


def test_lambda_init_follows_the_depth_schedule():
    for layer_index in (0, 1, 5, 23):
        assert lambda_init_schedule(layer_index) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * layer_index), abs=1e-15)
        assert DifferentialAttention(D, H, layer_index=layer_index).lambda_init == lambda_init_schedule(layer_index)
    assert lambda_init_schedule(0) == pytest.approx(0.2) and lambda_init_schedule(100) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="layer_index"):
        DifferentialAttention(D, H, layer_index=-1)
    with pytest.raises(ValueError, match="2 \\* num_heads"):
        DifferentialAttention(12, 4)


@torch.no_grad()
def test_distinct_from_multi_head_attention_with_the_same_weights():
    model = _model()
    ref = torch_mha_like(model, num_heads=2 * H)
    q, k, v = _inputs()
    assert (model(q, k, v) - ref(q, k, v)[0]).abs().max() > 1e-2


@torch.no_grad()
def test_every_constructor_argument_changes_the_output():
    base = _model()
    q, k, v = _inputs()
    out = base(q, k, v)
    for kwargs in ({"layer_index": 4}, {"lambda_init": 0.5}):
        other = _model(**kwargs)
        other.load_state_dict(base.state_dict())
        assert (other(q, k, v) - out).abs().max() > 1e-3, kwargs
    one = _model(num_heads=1)  # the same weights, cut into one head of width 8 instead of two of 4
    state = base.state_dict()
    state.update({n: p.repeat(2) for n, p in state.items() if n.startswith("lambda") or n == "norm.weight"})
    one.load_state_dict(state)
    assert (one(q, k, v) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if not n.endswith("proj.bias")})
    assert (no_bias(q, k, v) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    assert (dropped(q, k, v) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2)(q[..., :8]).shape == (2, 4, 8), "d_model"


@torch.no_grad()
def test_dropout_is_off_in_eval_and_weights_are_taken_before_it():
    # (The conformance suite's generic dropout check is exempted: the RMSNorm after the maps makes the output's
    # train-mode mean differ from eval even though F.dropout on each map is unbiased.)
    q, k, v = _inputs()
    with_dropout, without = _model(dropout=0.5), _model(dropout=0.0)
    for need_weights in (False, True):
        first = with_dropout(q, k, v, need_weights=need_weights)
        first = first[0] if need_weights else first
        again = without(q, k, v, need_weights=need_weights)
        assert torch.equal(first, again[0] if need_weights else again)
    _, eval_weights = with_dropout(q, k, v, need_weights=True)
    with_dropout.train()
    torch.manual_seed(0)
    train_out, train_weights = with_dropout(q, k, v, need_weights=True)
    assert torch.equal(train_weights, eval_weights)  # returned before dropout
    assert (train_out - with_dropout.eval()(q, k, v)).abs().max() > 1e-3  # but dropout did act
