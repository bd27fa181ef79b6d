"""mechanisms/nystromformer.py: exact softmax attention at m = T with the exact pseudo-inverse, an explicit
segment-by-segment oracle for m < T, the Newton-Schulz iteration against torch.linalg.pinv, and the error
falling as landmarks are added. The generic checks are the conformance suite's
(tests/conformance/entries/nystromformer.py).
"""
import math

import pytest
import torch

from mechanisms.nystromformer import NystromAttention, newton_schulz_pinv
from tests.oracles import load_matching_, random_inputs, randomize_, torch_mha_like

TOL = 1e-9
D, H = 8, 2


def _model(num_landmarks=4, pinv_iterations=None, d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = NystromAttention(d_model, num_heads, num_landmarks, pinv_iterations, **kwargs).double()
    return randomize_(model, biases_only=True).eval()


def _x(b=2, t=10, seed=1):
    return random_inputs(b, t, D, seed=seed)


@pytest.mark.parametrize("padded", [False, True])
def test_m_equal_t_with_the_exact_pseudo_inverse_is_softmax_attention(padded):
    t = 7
    model = _model(num_landmarks=t, pinv_iterations=None)
    x = _x(t=t)
    kpm = torch.ones(2, t, dtype=torch.bool)
    if padded:
        kpm[1, [2, 6]] = False
    expected, expected_w = torch_mha_like(model)(x, x, x, key_padding_mask=~kpm, average_attn_weights=False)
    with torch.no_grad():
        out, weights = model(x, key_padding_mask=kpm, need_weights=True)
        # S = S S^+ S: the Nystrom reconstruction from all rows and columns is exact (eq. (4)).
        assert (out - expected).abs().max() < TOL
        assert (weights - expected_w).abs().max() < TOL
        assert (model(x, key_padding_mask=kpm) - expected).abs().max() < TOL
        # more landmarks than tokens: every token is its own landmark, the same exact result
        more = _model(num_landmarks=t + 3)
        assert (more(x, key_padding_mask=kpm) - expected).abs().max() < TOL


def _segment_oracle(model, x, m):
    """Eq. (1)-(4) with explicit segments: boundaries ceil(s T / m), means, three softmaxes, torch pinv."""
    b, t, _ = x.shape
    dh = D // H
    lin = lambda layer: (x @ layer.weight.T + layer.bias).view(b, t, H, dh).transpose(1, 2)  # noqa: E731
    q, k, v = lin(model.q_proj), lin(model.k_proj), lin(model.v_proj)
    bounds = [-(-s * t // m) for s in range(m + 1)]  # ceil(s T / m)
    q_l = torch.stack([q[:, :, bounds[s]:bounds[s + 1]].mean(dim=2) for s in range(m)], dim=2)
    k_l = torch.stack([k[:, :, bounds[s]:bounds[s + 1]].mean(dim=2) for s in range(m)], dim=2)
    f = torch.softmax(q @ k_l.transpose(-2, -1) / math.sqrt(dh), dim=-1)
    a = torch.softmax(q_l @ k_l.transpose(-2, -1) / math.sqrt(dh), dim=-1)
    bb = torch.softmax(q_l @ k.transpose(-2, -1) / math.sqrt(dh), dim=-1)
    heads = f @ torch.linalg.pinv(a) @ bb @ v
    return heads.transpose(1, 2).reshape(b, t, D) @ model.out_proj.weight.T + model.out_proj.bias


@pytest.mark.parametrize("t,m", [(8, 4), (10, 4), (9, 2), (11, 5)])
def test_matches_the_segment_mean_oracle(t, m):
    model = _model(num_landmarks=m, pinv_iterations=None)
    x = _x(t=t)
    with torch.no_grad():
        assert (model(x) - _segment_oracle(model, x, m)).abs().max() < TOL
        # the module with enough Newton-Schulz steps is the module with the exact pseudo-inverse
        iterated = _model(num_landmarks=m, pinv_iterations=40)
        assert (iterated(x) - model(x)).abs().max() < 1e-7


def test_newton_schulz_converges_to_torch_pinv():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 8, 8, generator=g, dtype=torch.float64) * 2, dim=-1)
    exact = torch.linalg.pinv(a)
    errors = [(newton_schulz_pinv(a, i) - exact).abs().max().item() for i in (0, 6, 12, 20)]
    assert errors[0] > 1.0 and errors[-1] < 1e-10 * exact.abs().max().item(), errors  # it converges, from far
    # a singular A = diag(A_valid, 0), as for a segment of padding only: the iteration finds its pinv too
    singular = a.clone()
    singular[:, 5] = 0
    singular[:, :, 5] = 0
    assert (newton_schulz_pinv(singular, 30) - torch.linalg.pinv(singular)).abs().max() < 1e-9
    with pytest.raises(ValueError, match="iterations"):
        newton_schulz_pinv(a, -1)


def test_error_falls_as_landmarks_are_added():
    t = 16
    errors = {m: 0.0 for m in (2, 4, 8, 16)}
    for seed in range(4):
        x = _x(t=t, seed=seed)
        for m in errors:
            model = _model(num_landmarks=m, pinv_iterations=None, seed=seed)
            with torch.no_grad():
                errors[m] += (model(x) - torch_mha_like(model)(x, x, x)[0]).abs().mean().item()
    assert errors[2] > errors[4] > errors[8] > errors[16], errors
    assert errors[16] < 1e-8, errors


def test_distinct_from_multi_head_attention():
    model = _model(num_landmarks=3, pinv_iterations=6)
    x = _x(t=12)
    with torch.no_grad():
        assert (model(x) - torch_mha_like(model)(x, x, x)[0]).abs().max() > 1e-3


def test_mask_and_causal_are_refused():
    model = _model()
    x = _x(t=6)
    with pytest.raises(ValueError, match="mask is not supported"):
        model(x, mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        model(x, is_causal=True)
    with pytest.raises(ValueError, match="pinv_iterations"):
        NystromAttention(D, H, 4, pinv_iterations=-2)


def test_every_constructor_argument_changes_the_output():
    x = _x(t=12)
    base = _model(num_landmarks=4, pinv_iterations=6)
    out = base(x)
    state = base.state_dict()

    def same_weights(**kwargs):  # a model built with other arguments, holding the base's tensors
        return load_matching_(_model(**kwargs), state)(x)

    assert (same_weights(num_landmarks=3, pinv_iterations=6) - out).abs().max() > 1e-3, "num_landmarks"
    assert (same_weights(num_landmarks=4, pinv_iterations=2) - out).abs().max() > 1e-3, "pinv_iterations"
    assert (same_weights(num_landmarks=4, pinv_iterations=6, num_heads=4) - out).abs().max() > 1e-3, "num_heads"
    assert (same_weights(num_landmarks=4, pinv_iterations=6, bias=False) - out).abs().max() > 1e-3, "bias"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, 12, 4), "d_model"
