"""mechanisms/hybrid_attention.py (Based) against the paper's formulas, written out here as loops.

Oracles: the Taylor kernel identity phi(a).phi(b) = 1 + a.b + (a.b)^2 / 2; an explicit per-query loop over
the window softmax (eq. 2) and the Taylor linear attention (eq. 5); the token-by-token recurrence (eq. 6)
for the chunkwise form; torch.nn.MultiheadAttention in the limit window >= T - 1 without the linear branch.
"""
import math

import pytest
import torch

from mechanisms.hybrid_attention import (HybridAttention, _linear_chunkwise_causal, taylor_feature_map,
                                         taylor_linear_attention_recurrent)
from tests.oracles import mha_reference, random_inputs, randomize_

D, H, FD = 8, 2, 3
TOL = 1e-10


def _model(d_model=D, num_heads=H, window=2, feature_dim=FD, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(HybridAttention(d_model, num_heads, window, feature_dim=feature_dim, **kwargs).double().eval())


def _x(b=2, t=7, d=D, seed=1):
    return random_inputs(b, t, d, seed=seed)


def _loop_oracle(model, query, key, causal, keep=None):
    """Eq. (1), (2), (5), (8) one (batch, head, query) at a time; keep: (B, Tk) bool real keys or None."""
    bsz, tq, _ = query.shape
    tk = key.size(1)
    dh, heads = model.head_dim, model.num_heads
    q = model.q_proj(query).view(bsz, tq, heads, dh)
    k = model.k_proj(key).view(bsz, tk, heads, dh)
    v = model.v_proj(key).view(bsz, tk, heads, dh)
    if model.linear_branch:
        a = model.feature_q_proj(query).view(bsz, tq, heads, -1) / model.feature_dim ** 0.25
        b = model.feature_k_proj(key).view(bsz, tk, heads, -1) / model.feature_dim ** 0.25
    out = torch.zeros(bsz, tq, heads, dh, dtype=query.dtype)
    for n in range(bsz):
        for h in range(heads):
            for i in range(tq):
                pos = i + tk - tq
                keys = [j for j in range(tk) if (keep is None or keep[n, j]) and (not causal or j <= pos)]
                window = [j for j in keys if (pos - model.window <= j <= pos if causal
                                              else abs(pos - j) <= model.window)]
                parts = []
                if window:
                    s = torch.stack([q[n, i, h] @ k[n, j, h] / math.sqrt(dh) for j in window])
                    w = torch.softmax(s, 0)
                    parts.append(sum(w[r] * v[n, j, h] for r, j in enumerate(window)))
                if model.linear_branch and keys:
                    kern = [1 + a[n, i, h] @ b[n, j, h] + (a[n, i, h] @ b[n, j, h]) ** 2 / 2 for j in keys]
                    parts.append(sum(c * v[n, j, h] for c, j in zip(kern, keys)) / sum(kern))
                if parts:
                    out[n, i, h] = sum(parts) / len(parts)
    return model.out_proj(out.reshape(bsz, tq, heads * dh))


def test_taylor_feature_map_gives_the_second_order_taylor_kernel_exactly():
    g = torch.Generator().manual_seed(0)
    for d in (1, 3, 16):
        a, b = torch.randn(5, d, generator=g, dtype=torch.float64), torch.randn(5, d, generator=g, dtype=torch.float64)
        phi_a, phi_b = taylor_feature_map(a), taylor_feature_map(b)
        assert phi_a.shape == (5, 1 + d + d * d)
        s = (a * b).sum(-1)
        assert ((phi_a * phi_b).sum(-1) - (1 + s + s * s / 2)).abs().max() < TOL
    # The kernel is the Taylor polynomial of exp, so it is close to exp(s) for small s and never below 1/2.
    s = torch.linspace(-3, 3, 61, dtype=torch.float64)
    kernel = 1 + s + s * s / 2
    assert kernel.min() == pytest.approx(0.5)
    assert (kernel - s.exp()).abs()[s.abs() <= 0.1].max() < 2e-4


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
@pytest.mark.parametrize("padded", [False, True])
def test_chunkwise_causal_form_equals_the_recurrent_form(chunk_size, padded):
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 2, 9, FD, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64)
    keep = None
    if padded:  # padded keys: the recurrence simply never sees them
        real = torch.ones(2, 9, dtype=torch.bool)
        real[0, 2] = real[1, 5:7] = False
        keep = real[:, None, :, None].double()
    numerator, denominator = _linear_chunkwise_causal(a, b, v, keep, chunk_size)
    out = numerator / denominator
    if keep is None:
        expected = taylor_linear_attention_recurrent(a, b, v)
    else:
        # eq. (5) written out: query i reads the real keys j <= i
        expected = torch.zeros_like(out)
        for n in range(2):
            for h in range(2):
                for i in range(9):
                    js = [j for j in range(i + 1) if real[n, j]]
                    kern = torch.stack([1 + a[n, h, i] @ b[n, h, j] + (a[n, h, i] @ b[n, h, j]) ** 2 / 2 for j in js])
                    expected[n, h, i] = (kern[:, None] * v[n, h, js]).sum(0) / kern.sum()
    assert (out - expected).abs().max() < TOL


def test_recurrent_form_equals_the_explicit_formula():
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(1, 1, 6, FD, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 1, 6, 3, generator=g, dtype=torch.float64)
    out = taylor_linear_attention_recurrent(a, b, v)
    for i in range(6):
        kern = torch.stack([1 + a[0, 0, i] @ b[0, 0, j] + (a[0, 0, i] @ b[0, 0, j]) ** 2 / 2 for j in range(i + 1)])
        assert (out[0, 0, i] - (kern[:, None] * v[0, 0, :i + 1]).sum(0) / kern.sum()).abs().max() < TOL


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 2, 9])
def test_fast_and_explicit_paths_equal_the_loop_oracle(causal, window):
    model = _model(window=window)
    model.chunk_size = 3
    x = _x()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 1] = keep[1, 4] = False
    with torch.no_grad():
        for kpm in (None, keep):
            expected = _loop_oracle(model, x, x, causal, kpm)
            fast = model(x, key_padding_mask=kpm, is_causal=causal)
            explicit, weights = model(x, key_padding_mask=kpm, is_causal=causal, need_weights=True)
            assert (fast - expected).abs().max() < TOL
            assert (explicit - expected).abs().max() < TOL
            assert torch.allclose(weights.sum(-1), torch.ones(2, H, 7, dtype=torch.float64), atol=TOL)


def test_cross_lengths_are_aligned_bottom_right():
    model = _model(window=1)
    query, key = _x(t=3), _x(t=6, seed=5)
    with torch.no_grad():
        for causal in (False, True):
            assert (model(query, key, is_causal=causal) - _loop_oracle(model, query, key, causal)).abs().max() < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_without_linear_branch_and_with_a_full_window_it_is_multihead_attention(causal):
    model = _model(window=6, linear_branch=False)
    with torch.no_grad():
        x = _x()
        expected = mha_reference(model, x, is_causal=causal)[0]  # nn.MultiheadAttention, copied weights
        assert (model(x, is_causal=causal) - expected).abs().max() < TOL
        assert (model(x, is_causal=causal, need_weights=True)[0] - expected).abs().max() < TOL


def test_distinct_from_multihead_attention_outside_the_limit():
    full = _model(window=6, linear_branch=False)
    x = _x()
    with torch.no_grad():
        reference = full(x, is_causal=True)
        hybrid = _model(window=6)  # the same seed: the same q, k, v, out weights, plus the linear branch
        hybrid.load_state_dict(full.state_dict(), strict=False)
        assert (hybrid(x, is_causal=True) - reference).abs().max() > 1e-2
        narrow = _model(window=1, linear_branch=False)
        narrow.load_state_dict(full.state_dict())
        assert (narrow(x, is_causal=True) - reference).abs().max() > 1e-2


def test_every_constructor_argument_changes_the_output():
    base = _model()
    x = _x()
    with torch.no_grad():
        out = base(x, is_causal=True)

        def changed(**kwargs):
            other = _model(**kwargs)
            other.load_state_dict({n: p for n, p in base.state_dict().items() if n in other.state_dict()},
                                  strict=False)
            return (other(x, is_causal=True) - out).abs().max().item()

        assert changed(window=3) > 1e-3, "window"
        assert changed(linear_branch=False) > 1e-3, "linear_branch"
        # num_heads: the same q, k, v, out weights cut into 4 heads of 2 instead of 2 of 4 (window branch alone,
        # since the feature projections' shapes depend on num_heads)
        two, four = _model(linear_branch=False), _model(num_heads=4, linear_branch=False)
        four.load_state_dict(two.state_dict())
        assert (four(x, is_causal=True) - two(x, is_causal=True)).abs().max() > 1e-3, "num_heads"
        assert changed(bias=False) > 1e-3, "bias"
        other = _model(feature_dim=FD + 1)  # feature projections of another width
        other.load_state_dict({n: p for n, p in base.state_dict().items() if "feature" not in n}, strict=False)
        assert (other(x, is_causal=True) - out).abs().max() > 1e-3, "feature_dim"
    dropped = _model(dropout=0.5).train()
    dropped.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    assert (dropped(x, is_causal=True) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, 7, 4), "d_model"


def test_chunk_size_changes_cost_not_output_and_the_state_does_not_grow():
    model = _model()
    x = _x(t=11)
    with torch.no_grad():
        outs = []
        for chunk in (1, 4, 11, 64):
            model.chunk_size = chunk
            outs.append(model(x, is_causal=True))
    assert all((o - outs[0]).abs().max() < TOL for o in outs)
    # The recurrent state is (1 + d' + d'^2) x Dh per head whatever the length: here 13 x 4.
    assert taylor_feature_map(torch.zeros(FD)).numel() == 1 + FD + FD * FD
