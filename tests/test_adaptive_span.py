"""mechanisms/adaptive_span.py: spans covering every key give causal multi-head attention; the soft mask and
the attention against the formula written out; the span learns (gradient, penalty, cache length).

The generic checks (bad input, masked rows, key padding, causality, gradcheck, dropout, state dict, bf16)
are in the conformance suite: tests/conformance/entries/adaptive_span.py.
"""
import math

import pytest
import torch

from mechanisms.adaptive_span import AdaptiveSpanAttention, soft_span_mask
from tests.oracles import output_of, random_inputs, randomize_, torch_mha_like

FP64_TOL = 1e-10
D, H = 16, 4


def _model(max_span=8, ramp=3, init_span=2.5, d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = AdaptiveSpanAttention(d_model, num_heads, max_span, ramp=ramp, init_span=init_span, **kwargs).double()
    # non-zero biases, so that a dropped bias would be noticed; the span keeps its init_span
    return randomize_(model, skip=("span_fraction",)).eval()


def _inputs(b=2, tq=5, tk=7, seed=1):
    return random_inputs(b, (tq, tk, tk), D, seed=seed)


def _set_spans(model, spans):
    with torch.no_grad():
        model.span_fraction.copy_(torch.tensor(spans, dtype=torch.float64) / model.max_span)


@pytest.mark.parametrize("need_weights", [False, True])
def test_spans_covering_every_key_give_causal_torch_multihead_attention(need_weights):
    model = _model(max_span=8, init_span=6.0)  # z = 6 >= Tk - 1: every past key has mask 1
    ref = torch_mha_like(model)
    q, k, v = _inputs()
    future = torch.tensor([[j > i + 2 for j in range(7)] for i in range(5)])  # bottom-right: Tk - Tq = 2
    expected, expected_w = ref(q, k, v, attn_mask=future, average_attn_weights=False)
    ours = model(q, k, v, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < FP64_TOL
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < FP64_TOL


def test_soft_mask_is_the_papers_ramp():
    ramp = 4.0
    for z in (0.0, 1.5, 3.0, 7.25):
        for x in range(0, 14):
            if x <= z:
                expected = 1.0
            elif x >= z + ramp:
                expected = 0.0
            else:
                expected = (z + ramp - x) / ramp
            got = soft_span_mask(torch.tensor(float(x), dtype=torch.float64),
                                 torch.tensor(z, dtype=torch.float64), ramp)
            assert abs(got.item() - expected) < FP64_TOL, (z, x)


def test_attention_matches_the_formula_written_out():
    model = _model(max_span=8, ramp=3)
    spans = [0.0, 1.5, 2.25, 8.0]
    _set_spans(model, spans)
    q, k, v = _inputs()
    padding = torch.tensor([[True] * 7, [True, False, True, True, True, False, True]])
    out, weights = model(q, k, v, key_padding_mask=padding, need_weights=True)
    dh = D // H
    qp, kp, vp = model.q_proj(q), model.k_proj(k), model.v_proj(v)
    concat = torch.zeros(2, 5, D, dtype=torch.float64)
    for n in range(2):
        for h in range(H):
            cols = slice(h * dh, (h + 1) * dh)
            for i in range(5):
                position = i + 2
                numerators = torch.zeros(7, dtype=torch.float64)
                for j in range(position + 1):  # causal: keys at or before the query's position
                    if not padding[n, j]:
                        continue
                    x = position - j
                    m = min(1.0, max(0.0, (3 + spans[h] - x) / 3))
                    numerators[j] = m * torch.exp(qp[n, i, cols] @ kp[n, j, cols] / math.sqrt(dh))
                a = numerators / numerators.sum()
                assert (weights[n, h, i] - a).abs().max() < FP64_TOL, (n, h, i)
                concat[n, i, cols] = a @ vp[n, :, cols]
    assert (out - model.out_proj(concat)).abs().max() < FP64_TOL


def test_the_span_receives_a_gradient_and_the_penalty_is_the_documented_sum():
    model = _model(max_span=8, ramp=3)
    _set_spans(model, [0.5, 1.5, 2.5, 20.0])  # the last head's ramp lies beyond every key
    q, k, v = _inputs()
    model(q, k, v).pow(2).sum().backward()
    grad = model.span_fraction.grad
    assert (grad[:3] != 0).all() and grad[3] == 0  # only a span whose ramp covers some key can learn
    # Finite difference in the span of head 1 agrees with the gradient.
    eps = 1e-6
    with torch.no_grad():
        model.span_fraction[1] += eps
        up = model(q, k, v).pow(2).sum()
        model.span_fraction[1] -= 2 * eps
        down = model(q, k, v).pow(2).sum()
        model.span_fraction[1] += eps
    assert abs((up - down) / (2 * eps) - grad[1]) < 1e-6 * max(1.0, grad[1].abs().item())
    # The penalty is sum_h z_h in tokens; its gradient with respect to each fraction is max_span.
    model.span_fraction.grad = None
    penalty = model.span_penalty()
    assert abs(penalty.item() - sum([0.5, 1.5, 2.5, 20.0])) < FP64_TOL
    penalty.backward()
    assert torch.equal(model.span_fraction.grad, torch.full((H,), 8.0, dtype=torch.float64))
    model.clamp_span_()
    assert model.spans().tolist() == [0.5, 1.5, 2.5, 8.0]


def test_keys_beyond_span_plus_ramp_get_zero_weight_so_the_cache_can_be_cut():
    model = _model(max_span=16, ramp=3)
    _set_spans(model, [0.0, 1.0, 2.5, 1.0])
    x = _inputs(tq=12, tk=12)[0]
    out, weights = model(x, need_weights=True)
    distance = torch.arange(12)[:, None] - torch.arange(12)[None, :]
    for h, z in enumerate([0.0, 1.0, 2.5, 1.0]):
        assert (weights[:, h][:, distance >= z + 3] == 0).all()
        assert (weights[:, h][:, (distance >= 0) & (distance < z + 3)] > 0).all()
    assert model.cache_length() == math.ceil(2.5 + 3)
    # The last query with only the last cache_length() keys gives the same output as with all of them.
    cut = model.cache_length()
    assert (model(x[:, -1:], x[:, -cut:]) - out[:, -1:]).abs().max() < FP64_TOL


def test_distinct_from_causal_multi_head_attention():
    q, k, v = _inputs()
    full = _model(init_span=8.0)(q, k, v)  # = causal multi-head attention (test above)
    short = _model(init_span=1.0)(q, k, v)  # the same weights, span 1 and ramp 3
    assert (short - full).abs().max() > 1e-2


def test_every_constructor_argument_changes_the_output():
    q, k, v = _inputs()
    base = _model()
    out = base(q, k, v)

    def changed(**kwargs):
        other = _model(**kwargs)
        state = {n: p for n, p in base.state_dict().items() if n != "span_fraction" or "init_span" not in kwargs}
        other.load_state_dict(state, strict=False)
        return (other(q, k, v) - out).abs().max() > 1e-3

    assert changed(max_span=4), "max_span"  # the same fraction is a different number of tokens
    assert changed(ramp=1), "ramp"
    assert changed(init_span=0.5), "init_span"
    two = _model(num_heads=2)
    two.load_state_dict({n: p[:2] if n == "span_fraction" else p for n, p in base.state_dict().items()})
    assert (two(q, k, v) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if not n.endswith("bias")})
    assert (no_bias(q, k, v) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    torch.manual_seed(0)
    assert (dropped(q, k, v) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2)(q[..., :8]).shape == (2, 5, 8), "d_model"
    with pytest.raises(ValueError, match="init_span"):
        AdaptiveSpanAttention(D, H, max_span=8, init_span=9)
    with pytest.raises(ValueError, match="key"):
        base(q, k[:, :3], v[:, :3])
