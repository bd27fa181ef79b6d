"""mechanisms/convolutional_attention.py: the delta kernel is multi-head attention; for any kernel the module
equals an explicit loop over the convolution sum and the attention; the convolution is causal and depthwise;
padded tokens do not leak through it; distinctness and every argument.

The generic checks (bad input, masked rows, key padding, causality, gradcheck, dropout, state dict, bf16,
fused vs explicit) are in the conformance suite: tests/conformance/entries/convolutional_attention.py.
"""
import math

import pytest
import torch

from mechanisms.convolutional_attention import ConvolutionalAttention, causal_depthwise_conv
from tests.oracles import mha_reference, output_of, random_inputs, random_mask, randomize_

FP64_TOL = 1e-10
D, H = 16, 4


def _model(kernel_size=3, d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(ConvolutionalAttention(d_model, num_heads, kernel_size=kernel_size, **kwargs).double()).eval()


def _inputs(b=2, tq=4, tk=6, seed=1):
    return random_inputs(b, (tq, tk, tk), D, seed=seed)


def _delta(model):
    """Kernel 1 on the current token (the last tap of a PyTorch cross-correlation), 0 elsewhere, no bias."""
    with torch.no_grad():
        for conv in (model.q_conv, model.k_conv, model.v_conv):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0
            conv.bias.zero_()


def _conv_loop(x, conv):
    """eq. (2) as a loop: y[t, c] = sum_{s < k} w[c, s] x[t - s, c] + beta[c], with w[c, s] = weight[c, 0, k-1-s]."""
    b, t_len, c_len = x.shape
    k = conv.kernel_size[0]
    y = torch.zeros_like(x)
    for t in range(t_len):
        for c in range(c_len):
            total = conv.bias[c].clone()
            for s in range(k):
                if t - s >= 0:
                    total = total + conv.weight[c, 0, k - 1 - s] * x[:, t - s, c]
            y[:, t, c] = total
    return y


@pytest.mark.parametrize("need_weights", [False, True])
def test_delta_kernel_is_torch_multihead_attention(need_weights):
    model = _model()
    _delta(model)
    q, k, v = _inputs()
    mask = random_mask((2, H, 4, 6))
    expected, expected_w = mha_reference(model, q, k, v, mask=mask)  # nn.MultiheadAttention, copied weights
    ours = model(q, k, v, mask=mask, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < FP64_TOL
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < FP64_TOL


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kernel_size", [2, 3])
def test_matches_an_explicit_loop(kernel_size, need_weights):
    model = _model(kernel_size)
    q, k, v = _inputs(tq=3, tk=5)
    padding = torch.tensor([[True, True, True, True, False], [True, False, True, True, True]])
    with torch.no_grad():
        real = padding[..., None]
        qc = _conv_loop(model.q_proj(q), model.q_conv)  # cross-attention: the queries are not padded
        kc = _conv_loop(model.k_proj(k) * real, model.k_conv)
        vc = _conv_loop(model.v_proj(v) * real, model.v_conv)
        dh = D // H
        concat = torch.zeros(2, 3, D, dtype=torch.float64)
        for n in range(2):
            for h in range(H):
                cols = slice(h * dh, (h + 1) * dh)
                for i in range(3):
                    visible = [j for j in range(5) if j <= i + 2 and padding[n, j]]
                    scores = torch.stack([qc[n, i, cols] @ kc[n, j, cols] / math.sqrt(dh) for j in visible])
                    concat[n, i, cols] = torch.softmax(scores, 0) @ vc[n, visible, cols]
        expected = model.out_proj(concat)
        ours = output_of(model(q, k, v, key_padding_mask=padding, is_causal=True, need_weights=need_weights))
    assert (ours - expected).abs().max() < FP64_TOL


def test_the_convolution_is_causal_and_depthwise():
    conv = _model(kernel_size=3).k_conv
    x = torch.randn(1, 8, D, dtype=torch.float64)
    y = causal_depthwise_conv(x, conv)
    assert (y - _conv_loop(x, conv)).abs().max() < FP64_TOL
    x2 = x.clone()
    x2[0, 4, 5] += 1.0  # one token, one channel
    changed = (causal_depthwise_conv(x2, conv) - y).abs() > 0
    expected = torch.zeros_like(changed)
    expected[0, 4:7, 5] = True  # only that channel, at that token and the k-1 = 2 after it
    assert torch.equal(changed, expected)
    # A shift kernel (1 on the previous token) makes every key its predecessor's: Primer's one-layer induction.
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, -2] = 1.0
        conv.bias.zero_()
    shifted = causal_depthwise_conv(x, conv)
    assert torch.equal(shifted[:, 1:], x[:, :-1]) and (shifted[:, 0] == 0).all()


def test_causal_attention_with_a_causal_convolution_never_sees_the_future():
    model = _model()
    x = _inputs(tq=8)[0].requires_grad_()
    out = model(x, is_causal=True)
    out[:, :5].sum().backward()
    assert x.grad[:, 5:].abs().max() == 0
    assert x.grad[:, :5].abs().min() > 0


def test_a_padded_token_does_not_leak_into_its_neighbours_through_the_convolution():
    model = _model()
    x = _inputs(tq=7)[0]
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[:, 3] = False  # a padded token in the middle: tokens 4 and 5 would read it through the kernel
    out = model(x, key_padding_mask=padding)
    moved = x.clone()
    moved[:, 3] = torch.randn(2, D, dtype=torch.float64) * 10
    real_rows = padding[0]
    assert (model(moved, key_padding_mask=padding)[:, real_rows] - out[:, real_rows]).abs().max() < FP64_TOL
    # The leak is real: convolving the projected keys without zeroing token 3 first changes the keys of 4 and 5.
    with torch.no_grad():
        before = causal_depthwise_conv(model.k_proj(x), model.k_conv)
        after = causal_depthwise_conv(model.k_proj(moved), model.k_conv)
    assert (after[:, 4:6] - before[:, 4:6]).abs().min() > 0 and torch.equal(after[:, 6], before[:, 6])


def test_distinct_from_multi_head_attention():
    q, k, v = _inputs()
    model = _model()
    reference = _model()
    _delta(reference)  # the same projections, delta kernels: multi-head attention (test above)
    assert (model(q, k, v) - reference(q, k, v)).abs().max() > 1e-2


def test_every_constructor_argument_changes_the_output():
    q, k, v = _inputs()
    base = _model()
    out = base(q, k, v)
    # kernel_size: the same weights with a longer kernel whose extra (oldest) taps are non-zero.
    longer = _model(kernel_size=4)
    state = dict(base.state_dict())
    for name in ("q_conv", "k_conv", "v_conv"):
        state[f"{name}.weight"] = torch.cat([torch.full((D, 1, 1), 0.5, dtype=torch.float64),
                                             state[f"{name}.weight"]], dim=-1)
    longer.load_state_dict(state)
    assert (longer(q, k, v) - out).abs().max() > 1e-3, "kernel_size"
    two = _model(num_heads=2)
    two.load_state_dict(base.state_dict())
    assert (two(q, k, v) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(q, k, v) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    torch.manual_seed(0)
    assert (dropped(q, k, v) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2)(q[..., :8]).shape == (2, 4, 8), "d_model"
