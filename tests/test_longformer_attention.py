"""mechanisms/longformer_attention.py against dense attention with the band-plus-global mask, and full attention.

The oracle builds the mask of the paper's pattern with a double loop over positions and runs plain softmax
attention row by row (global rows with the global projections), so it shares nothing with the blocked code.
The generic checks (padding, causality, dropout, gradcheck, dtypes) are the conformance suite's
(tests/conformance/entries/longformer_attention.py).
"""
import math

import pytest
import torch

from mechanisms.longformer_attention import LongformerAttention, longformer_mask
from tests.oracles import mha_reference, random_inputs, randomize_

TOL = 1e-10
D, H = 8, 2


def _model(window=2, global_projections=True, d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = LongformerAttention(d_model, num_heads, window, global_projections=global_projections, **kwargs).double()
    return randomize_(model).eval()


def _x(b=2, t=9, seed=1):
    return random_inputs(b, t, D, seed=seed)


def _lin(layer, x):
    return x @ layer.weight.T + layer.bias


def _reference(model, x, window, glob, kpm, causal):
    """Dense attention, row by row, under M_ij = (|i-j| <= w or g_i or g_j) and real_j (and j <= i)."""
    b, t, _ = x.shape
    dh = D // H
    split = lambda y: y.view(b, t, H, dh)  # noqa: E731
    q, k, v = split(_lin(model.q_proj, x)), split(_lin(model.k_proj, x)), split(_lin(model.v_proj, x))
    if model.global_projections:
        qg, kg, vg = split(_lin(model.q_global, x)), split(_lin(model.k_global, x)), split(_lin(model.v_global, x))
    else:
        qg, kg, vg = q, k, v
    heads = torch.zeros(b, t, H, dh, dtype=x.dtype)
    weights = torch.zeros(b, H, t, t, dtype=x.dtype)
    for n in range(b):
        for i in range(t):
            allowed = torch.tensor([(abs(i - j) <= window or bool(glob[n, i]) or bool(glob[n, j]))
                                    and bool(kpm[n, j]) and (j <= i or not causal) for j in range(t)])
            if not allowed.any():
                continue  # a row with no visible key: zero output, zero weights
            qq, kk, vv = (qg, kg, vg) if glob[n, i] else (q, k, v)
            scores = torch.einsum("hd,jhd->hj", qq[n, i], kk[n]) / math.sqrt(dh)
            w = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)  # (H, T)
            weights[n, :, i] = w
            heads[n, i] = torch.einsum("hj,jhd->hd", w, vv[n])
    return _lin(model.out_proj, heads.reshape(b, t, D)), weights


def _globals(b, t, positions):
    g = torch.zeros(b, t, dtype=torch.bool)
    for n, ps in enumerate(positions):
        g[n, ps] = True
    return g


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("global_projections", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window,t", [(0, 7), (1, 9), (2, 9), (3, 10), (4, 5)])
def test_equals_dense_attention_with_the_band_plus_global_mask(need_weights, global_projections, causal, window, t):
    model = _model(window=window, global_projections=global_projections)
    x = _x(t=t)
    glob = _globals(2, t, [[0], [1, t - 2]])  # different numbers of global tokens per sequence
    kpm = torch.ones(2, t, dtype=torch.bool)
    kpm[1, -1] = False  # one padded key
    expected, expected_w = _reference(model, x, window, glob, kpm, causal)
    with torch.no_grad():
        result = model(x, key_padding_mask=kpm, is_causal=causal, need_weights=need_weights, global_mask=glob)
    out = result[0] if need_weights else result
    assert (out - expected).abs().max() < TOL
    if need_weights:
        assert (result[1] - expected_w).abs().max() < TOL


def test_longformer_mask_is_the_pattern_of_the_paper():
    glob = _globals(1, 8, [[3]])
    m = longformer_mask(8, 1, glob, is_causal=False)[0, 0]
    expected = torch.tensor([[abs(i - j) <= 1 or i == 3 or j == 3 for j in range(8)] for i in range(8)])
    assert torch.equal(m, expected)
    assert torch.equal(longformer_mask(8, 1, glob, is_causal=True)[0, 0], expected & torch.ones(8, 8).tril().bool())


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_the_sequence_is_full_attention(causal):
    t = 6
    model = _model(window=t - 1)
    with torch.no_grad():
        x = _x(t=t)
        expected = mha_reference(model, x, is_causal=causal)[0]  # nn.MultiheadAttention, copied weights
        assert (model(x, is_causal=causal) - expected).abs().max() < TOL
        # and a window of T - 2 is not: the two ends no longer see each other.
        assert (_model(window=t - 2)(x) - mha_reference(model, x)[0]).abs().max() > 1e-3


def test_information_crosses_the_sequence_in_one_layer_only_through_global_tokens():
    t = 10
    model = _model(window=1)
    x = _x(t=t)
    x2 = x.clone()
    x2[:, -1] += 1.0  # change the last token only
    with torch.no_grad():
        # Without global tokens, token 0 cannot see token T-1 (|0 - 9| > w): its output is unchanged.
        assert (model(x)[:, 0] - model(x2)[:, 0]).abs().max() < TOL
        # With token T-1 global, every token attends to it (eq. (2), g_j) ...
        glob = _globals(2, t, [[t - 1], [t - 1]])
        assert (model(x, global_mask=glob)[:, 0] - model(x2, global_mask=glob)[:, 0]).abs().min() > 1e-6
        # ... and with token 4 global, it attends to every token (g_i), so it sees the change too.
        glob = _globals(2, t, [[4], [4]])
        assert (model(x, global_mask=glob)[:, 4] - model(x2, global_mask=glob)[:, 4]).abs().min() > 1e-6
        assert (model(x, global_mask=glob)[:, 0] - model(x2, global_mask=glob)[:, 0]).abs().max() < TOL


def test_distinct_from_multi_head_attention():
    model = _model(window=2)
    full = _model(window=20)  # same weights, window covering everything
    x = _x(t=9)
    with torch.no_grad():
        assert (model(x) - full(x)).abs().max() > 1e-3
        glob = _globals(2, 9, [[0], [0]])
        assert (model(x, global_mask=glob) - full(x)).abs().max() > 1e-3


def test_a_dense_mask_is_refused_and_a_bad_global_mask_too():
    model = _model()
    x = _x(t=5)
    with pytest.raises(ValueError, match="mask is not supported"):
        model(x, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"global_mask.*\(2, 5\)"):
        model(x, global_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="global_mask"):
        model(x, global_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="window"):
        LongformerAttention(D, H, window=-1)


def test_every_constructor_argument_changes_the_output():
    x = _x(t=9)
    glob = _globals(2, 9, [[0], [3]])
    base = _model()
    out = base(x, global_mask=glob)
    state = base.state_dict()
    assert (_model(window=1)(x, global_mask=glob) - out).abs().max() > 1e-3, "window"
    local_only = _model(global_projections=False)
    local_only.load_state_dict({k: v for k, v in state.items() if "global" not in k})
    assert (local_only(x, global_mask=glob) - out).abs().max() > 1e-3, "global_projections"
    four = _model(num_heads=4)
    four.load_state_dict(state)
    assert (four(x, global_mask=glob) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({k: v for k, v in state.items() if k.endswith("weight")})
    assert (no_bias(x, global_mask=glob) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    dropped.load_state_dict(state)
    assert (dropped(x, global_mask=glob) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, 9, 4), "d_model"
