"""mechanisms/retention.py: the parallel, recurrent and chunkwise forms against a double loop over the paper.

The oracle is written here, from the paper's complex-number notation: each pair of coordinates (2i, 2i+1)
of q_n and k_m is a complex number, rotated by e^{i n theta_i} and e^{i m theta_i}; the retention of query n
is sum_{m <= n} gamma^(n - m) Re(q_n . conj(k_m)) / sqrt(Dh) v_m, one pair at a time; then the per-head RMS
normalisation, the swish gate and the output projection, written out.
"""
import math

import pytest
import torch

from mechanisms.retention import (MultiScaleRetention, decay_matrix, retention_chunkwise, retention_decays,
                                  retention_parallel, retention_recurrent)
from tests.oracles import mha_reference, random_inputs, randomize_

FP64_TOL = 1e-10
D, H, T = 8, 2, 11
CHUNKS = [1, 2, 3, 4, 7, 11, 16]


def _model(d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(MultiScaleRetention(d_model, num_heads, **kwargs).double())


def _x(b=2, t=T, seed=1):
    return random_inputs(b, t, D, seed=seed)


def _double_loop(model, x, padding=None):
    b, t, _ = x.shape
    h, dh = model.num_heads, model.head_dim
    theta = torch.tensor([10000.0 ** (-2 * i / dh) for i in range(dh // 2)], dtype=torch.float64)
    as_complex = lambda y: torch.complex(y[..., 0::2], y[..., 1::2])  # noqa: E731
    q = as_complex(model.q_proj(x).view(b, t, h, dh))  # (B, T, H, Dh/2) complex
    k = as_complex(model.k_proj(x).view(b, t, h, dh))
    v = model.v_proj(x).view(b, t, h, dh)
    heads = torch.zeros(b, t, h, dh, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            gamma = 1 - 2 ** (-5 - hi)
            for n in range(t):
                qn = q[bi, n, hi] * torch.exp(1j * n * theta)
                for m in range(n + 1):
                    if padding is not None and not padding[bi, m]:
                        continue
                    km = k[bi, m, hi] * torch.exp(1j * m * theta)
                    score = (qn * km.conj()).sum().real / math.sqrt(dh)
                    heads[bi, n, hi] += gamma ** (n - m) * score * v[bi, m, hi]
    rms = heads.pow(2).mean(-1, keepdim=True).add(model.eps).sqrt()
    gate = model.g_proj(x) * torch.sigmoid(model.g_proj(x))  # swish
    return model.out_proj(gate * (heads / rms).reshape(b, t, D))


@torch.no_grad()
def test_parallel_recurrent_and_chunkwise_forms_equal_the_double_loop():
    model = _model()
    x = _x()
    expected = _double_loop(model, x)
    out, scores = model(x, need_weights=True)
    assert (out - expected).abs().max() < FP64_TOL, "parallel"
    assert (scores.triu(1) == 0).all()  # nothing from the future
    for chunk in CHUNKS:
        model.chunk_size = chunk
        assert (model(x) - expected).abs().max() < FP64_TOL, f"chunkwise, chunk {chunk}"
    for prompt in (1, 5, 10):
        out, state = model.prefill(x[:, :prompt])
        outputs = [out]
        for i in range(prompt, T):
            step_out, state = model.step(x[:, i:i + 1], state)
            outputs.append(step_out)
        assert state[0].shape == (2, H, D // H, D // H) and state[1] == T  # a fixed-size state, whatever T
        assert (torch.cat(outputs, 1) - expected).abs().max() < FP64_TOL, f"prefill {prompt} + recurrent steps"
    outputs, state = [], None
    for i in range(T):  # decoding from nothing
        step_out, state = model.step(x[:, i:i + 1], state)
        outputs.append(step_out)
    assert (torch.cat(outputs, 1) - expected).abs().max() < FP64_TOL, "recurrent from the first token"


def test_the_three_functions_agree_and_carry_their_state():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 9, 4, dtype=torch.float64, generator=g) for _ in range(3))
    gammas = torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64)
    parallel, _ = retention_parallel(q, k, v, gammas)
    recurrent, state_r = retention_recurrent(q, k, v, gammas)
    for chunk in (2, 4, 9):
        chunkwise, state_c = retention_chunkwise(q, k, v, gammas, chunk)
        assert (chunkwise - parallel).abs().max() < FP64_TOL
        assert (state_c - state_r).abs().max() < FP64_TOL
    assert (recurrent - parallel).abs().max() < FP64_TOL
    # Continuing from a state: the second half with the first half's state equals the whole sequence's second half.
    _, first = retention_chunkwise(q[:, :, :5], k[:, :, :5], v[:, :, :5], gammas, 2)
    second, _ = retention_chunkwise(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], gammas, 3, state=first)
    assert (second - parallel[:, :, 5:]).abs().max() < FP64_TOL
    # The state is the decayed sum of outer products: S_T = sum_m gamma^(T-1-m) k_m^T v_m.
    weights = gammas[:, None] ** torch.arange(8, -1, -1, dtype=torch.float64)  # (H, T)
    expected_state = torch.einsum("ht,bhtd,bhte->bhde", weights, k, v)
    assert (state_r - expected_state).abs().max() < FP64_TOL


def test_decays_follow_the_paper_and_the_decay_matrix_is_causal():
    assert torch.allclose(retention_decays(4), torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256],
                                                            dtype=torch.float64), rtol=0, atol=1e-15)
    d = decay_matrix(torch.tensor([0.5], dtype=torch.float64), 4)[0]
    assert torch.equal(d, torch.tensor([[1, 0, 0, 0], [0.5, 1, 0, 0], [0.25, 0.5, 1, 0], [0.125, 0.25, 0.5, 1]],
                                       dtype=torch.float64))


@torch.no_grad()
def test_key_padding_equals_the_double_loop_in_every_form():
    model = _model()
    x = _x()
    padding = torch.ones(2, T, dtype=torch.bool)
    padding[0, 3] = False
    padding[1, :2] = False
    expected = _double_loop(model, x, padding)
    assert (model(x, key_padding_mask=padding) - expected).abs().max() < FP64_TOL
    model.chunk_size = 4
    assert (model(x, key_padding_mask=padding) - expected).abs().max() < FP64_TOL


@torch.no_grad()
def test_distinct_from_softmax_attention_with_the_same_projections():
    model = _model()
    x = _x()
    softmax = mha_reference(model, x, is_causal=True)[0]  # causal softmax attention, the same four projections
    assert (model(x) - softmax).abs().max() > 1e-2


@torch.no_grad()
def test_every_constructor_argument_changes_the_output():
    base = _model()
    x = _x()
    out = base(x)
    four = _model(num_heads=4)
    four.load_state_dict(base.state_dict())  # same weights, 4 heads of 2 with 4 decays instead of 2 of 4
    assert (four(x) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(x) - out).abs().max() > 1e-3, "bias"
    big_eps = _model(eps=1.0)
    big_eps.load_state_dict(base.state_dict())
    assert (big_eps(x) - out).abs().max() > 1e-3, "eps"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, T, 4), "d_model"
    # chunk_size changes the work, never the result: proven for 7 sizes above.


def test_a_general_mask_and_odd_head_dims_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="mask.*key_padding_mask"):
        model(_x(), mask=torch.ones(T, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="head_dim"):
        MultiScaleRetention(6, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, d_model\)"):
        model.step(_x()[:, :2])
