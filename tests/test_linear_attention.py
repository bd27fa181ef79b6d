"""mechanisms/linear_attention.py: every form against an explicit double loop over the paper's formula.

The oracle is written here: for each batch element, head and query i, out_i = sum_j s_ij v_j / sum_j s_ij with
s_ij = phi(q_i) . phi(k_j), phi(x) = elu(x) + 1, over the keys j visible to i, computed one (i, j) pair at a
time from the module's projections. The forms under test (explicit masked matrix, O(T) non-causal sums,
chunkwise for many chunk sizes, recurrent, naive cumulative sum, prefill + step decoding) must all equal it.
"""
import math

import pytest
import torch

from mechanisms.linear_attention import (LinearAttention, causal_linear_attention_chunkwise,
                                         causal_linear_attention_cumsum, elu_feature_map,
                                         linear_attention_recurrent)
from tests.oracles import mha_reference, output_of, random_inputs, randomize_

FP64_TOL = 1e-10
D, H, T = 8, 2, 11
CHUNKS = [1, 2, 3, 4, 5, 7, 11, 16]  # 11 is prime: every chunk size except 1, 11 and 16 leaves a ragged chunk


def _model(d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(LinearAttention(d_model, num_heads, **kwargs).double())


def _x(b=2, t=T, seed=1):
    return random_inputs(b, t, D, seed=seed)


def _heads(model, query, key, value):
    """phi(Q), phi(K), V from the module's projections, with phi = elu + 1 written out here."""
    split = lambda t: t.view(t.size(0), t.size(1), model.num_heads, -1).transpose(1, 2)  # noqa: E731
    phi = lambda t: torch.where(t > 0, t + 1, torch.exp(t))  # elu(x) + 1 = x + 1 for x > 0, e^x otherwise  # noqa: E731
    return phi(split(model.q_proj(query))), phi(split(model.k_proj(key))), split(model.v_proj(value))


def _double_loop(model, query, key, value, visible):
    """out[b, i] = W_o concat_h( sum_j vis * s_ij v_j / sum_j vis * s_ij ) + b_o, one pair at a time."""
    pq, pk, v = _heads(model, query, key, value)
    b, h, tq, _ = pq.shape
    heads = torch.zeros(b, h, tq, v.size(-1), dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                num, den = torch.zeros(v.size(-1), dtype=torch.float64), 0.0
                for j in range(pk.size(2)):
                    if visible(bi, i, j):
                        s = float(pq[bi, hi, i] @ pk[bi, hi, j])
                        num, den = num + s * v[bi, hi, j], den + s
                if den > 0:
                    heads[bi, hi, i] = num / den
    return model.out_proj(heads.transpose(1, 2).reshape(b, tq, -1))


def _causal(tq, tk, padding=None):
    return lambda b, i, j: j <= i + tk - tq and (padding is None or bool(padding[b, j]))


@torch.no_grad()
def test_every_form_equals_the_double_loop_for_every_chunk_size():
    model = _model()
    x = _x()
    expected = _double_loop(model, x, x, x, _causal(T, T))
    assert (output_of(model(x, is_causal=True, need_weights=True)) - expected).abs().max() < FP64_TOL, "parallel"
    for chunk in CHUNKS:
        model.chunk_size = chunk
        assert (model(x, is_causal=True) - expected).abs().max() < FP64_TOL, f"chunkwise, chunk {chunk}"
    # The functions of the file on the module's features: recurrent and naive cumulative sum.
    pq, pk, v = _heads(model, x, x, x)
    finish = lambda heads: model.out_proj(heads.transpose(1, 2).reshape(2, T, D))  # noqa: E731
    assert (finish(linear_attention_recurrent(pq, pk, v)[0]) - expected).abs().max() < FP64_TOL, "recurrent"
    assert (finish(causal_linear_attention_cumsum(pq, pk, v)) - expected).abs().max() < FP64_TOL, "cumsum"
    # Decoding: prefill a prompt, then one token at a time from the state.
    for prompt in (1, 4, 10):
        out, state = model.prefill(x[:, :prompt])
        steps = [model.step(x[:, i:i + 1], state) for i in [prompt]]
        outputs = [out]
        for i in range(prompt, T):
            step_out, state = model.step(x[:, i:i + 1], state)
            outputs.append(step_out)
        assert (torch.cat(outputs, dim=1) - expected).abs().max() < FP64_TOL, f"prefill {prompt} + step"
        assert steps[0][1].shape == state.shape  # the state does not grow with the context


@torch.no_grad()
def test_key_padding_in_every_form_equals_the_double_loop():
    model = _model()
    x = _x()
    padding = torch.ones(2, T, dtype=torch.bool)
    padding[1, 7:] = False
    padding[0, 2] = False
    expected = _double_loop(model, x, x, x, lambda b, i, j: bool(padding[b, j]))
    assert (model(x, key_padding_mask=padding) - expected).abs().max() < FP64_TOL, "non-causal O(T)"
    assert (output_of(model(x, key_padding_mask=padding, need_weights=True)) - expected).abs().max() < FP64_TOL
    expected = _double_loop(model, x, x, x, _causal(T, T, padding))
    for chunk in (3, 16):
        model.chunk_size = chunk
        assert (model(x, key_padding_mask=padding, is_causal=True) - expected).abs().max() < FP64_TOL, chunk


@torch.no_grad()
@pytest.mark.parametrize("tq,tk", [(4, 9), (9, 4)])
def test_cross_attention_and_bottom_right_causal_equal_the_double_loop(tq, tk):
    model = _model(chunk_size=3)
    query, key, value = _x(t=tq, seed=2), _x(t=tk, seed=3), _x(t=tk, seed=4)
    expected = _double_loop(model, query, key, value, lambda b, i, j: True)
    assert (model(query, key, value) - expected).abs().max() < FP64_TOL, "non-causal"
    expected = _double_loop(model, query, key, value, _causal(tq, tk))
    assert (model(query, key, value, is_causal=True) - expected).abs().max() < FP64_TOL, "causal chunkwise"
    assert (output_of(model(query, key, value, is_causal=True, need_weights=True)) - expected).abs().max() < FP64_TOL


def test_chunkwise_state_is_the_sum_over_all_tokens():
    g = torch.Generator().manual_seed(0)
    pq, pk = (elu_feature_map(torch.randn(1, 2, 7, 3, dtype=torch.float64, generator=g)) for _ in range(2))
    v = torch.randn(1, 2, 7, 4, dtype=torch.float64, generator=g)
    _, state = causal_linear_attention_chunkwise(pq, pk, v, chunk_size=3, return_state=True)
    expected_s = torch.einsum("bhtf,bhtd->bhfd", pk, v)  # sum_j phi(k_j) v_j^T
    assert (state[..., :4] - expected_s).abs().max() < FP64_TOL
    assert (state[..., 4] - pk.sum(dim=2)).abs().max() < FP64_TOL  # z = sum_j phi(k_j)
    assert (elu_feature_map(torch.tensor([-2.0, 0.0, 3.0])) - torch.tensor([math.exp(-2.0), 1.0, 4.0])).abs().max() < 1e-6


@torch.no_grad()
def test_distinct_from_softmax_attention_with_the_same_projections():
    model = _model()
    x = _x()
    softmax = mha_reference(model, x, is_causal=True)[0]  # causal softmax attention, the same four projections
    assert (model(x, is_causal=True) - softmax).abs().max() > 1e-2


@torch.no_grad()
def test_every_constructor_argument_changes_the_output():
    base = _model()
    x = _x()
    out = base(x)
    two = _model(num_heads=4)
    two.load_state_dict(base.state_dict())  # same weights, cut into 4 heads instead of 2
    assert (two(x) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(x) - out).abs().max() > 1e-3, "bias"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, T, 4), "d_model"
    # chunk_size changes the work, never the result: proven for 8 sizes in the test above.


def test_a_general_mask_is_refused_and_step_takes_one_token():
    model = _model()
    x = _x()
    with pytest.raises(ValueError, match="mask.*key_padding_mask"):
        model(x, mask=torch.ones(T, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        LinearAttention(D, H, chunk_size=0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, d_model\)"):
        model.step(x[:, :2])
