"""mechanisms/self_attention.py against the explicit formula and torch.nn.MultiheadAttention(num_heads=1).

SelfAttention has no output projection, so PyTorch's module gets the same W_Q, W_K, W_V and an identity
output projection with zero bias.
"""
import math

import pytest
import torch
import torch.nn as nn

from mechanisms.self_attention import SelfAttention

FP64_TOL = 1e-10
FP32_TOL = 1e-5
D = 8


def _model(d_model=D, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = SelfAttention(d_model, **kwargs).to(dtype)
    with torch.no_grad():  # non-zero biases, so that a dropped bias would be noticed
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def _torch_copy(model, num_heads=1):
    """nn.MultiheadAttention with `model`'s W_Q, W_K, W_V and an identity output projection."""
    bias = model.q_proj.bias is not None
    ref = nn.MultiheadAttention(model.d_model, num_heads, bias=bias, batch_first=True,
                                dtype=model.q_proj.weight.dtype)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([model.q_proj.weight, model.k_proj.weight, model.v_proj.weight]))
        ref.out_proj.weight.copy_(torch.eye(model.d_model))
        if bias:
            ref.in_proj_bias.copy_(torch.cat([model.q_proj.bias, model.k_proj.bias, model.v_proj.bias]))
            ref.out_proj.bias.zero_()
    return ref.eval()


def _formula(model, x, allowed=None):
    """Y = softmax(Q K^T / sqrt(d_model)) V, written from the page, one token pair at a time."""
    Q, K, V = model.q_proj(x), model.k_proj(x), model.v_proj(x)
    B, T, d = x.shape
    out = torch.zeros_like(V)
    for b in range(B):
        for i in range(T):
            scores = [float(Q[b, i] @ K[b, j]) / math.sqrt(d) for j in range(T)]
            keep = [j for j in range(T) if allowed is None or allowed[b, i, j]]
            top = max(scores[j] for j in keep)
            e = {j: math.exp(scores[j] - top) for j in keep}
            total = sum(e.values())
            out[b, i] = sum(e[j] / total * V[b, j] for j in keep)
    return out


def _x(b=2, t=5, dtype=torch.float64, seed=1):
    return torch.randn(b, t, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _random_mask(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.4
    mask[..., 0] = True  # every query keeps a key (PyTorch's module gives NaN otherwise)
    return mask


def _out(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_the_formula_written_out(need_weights):
    model = _model().eval()
    x = _x()
    with torch.no_grad():
        assert (_out(model(x, need_weights=need_weights)) - _formula(model, x)).abs().max() < FP64_TOL
        allowed = torch.ones(2, 5, 5, dtype=torch.bool).tril()
        assert (_out(model(x, is_causal=True, need_weights=need_weights))
                - _formula(model, x, allowed)).abs().max() < FP64_TOL


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_matches_torch_multihead_attention_with_one_head(need_weights, bias, dtype, tol):
    model = _model(bias=bias, dtype=dtype).eval()
    x = _x(dtype=dtype)
    mask = _random_mask((2, 1, 5, 5))
    expected, expected_w = _torch_copy(model)(x, x, x, attn_mask=~mask[:, 0], average_attn_weights=False)
    ours = model(x, mask=mask, need_weights=need_weights)
    assert (_out(ours) - expected).abs().max() < tol
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < tol


def test_distinct_from_multi_head_attention_with_the_same_weights():
    # Cutting the same W_Q, W_K, W_V into two heads (plain MHA, identity output) gives a different answer:
    # one head of width d_model is not H heads of width d_model / H.
    model = _model().eval()
    x = _x()
    two_heads, _ = _torch_copy(model, num_heads=2)(x, x, x)
    one_head, _ = _torch_copy(model, num_heads=1)(x, x, x)
    assert (model(x) - one_head).abs().max() < FP64_TOL
    assert (model(x) - two_heads).abs().max() > 1e-3


def test_every_constructor_argument_changes_the_output():
    base = _model().eval()
    x = _x()
    out = base(x)
    no_bias = SelfAttention(D, bias=False).to(torch.float64).eval()
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(x) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    torch.manual_seed(0)
    assert (dropped(x) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=6)(x[..., :6]).shape == (2, 5, 6), "d_model sets the width"


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_length(need_weights):
    # B == T == 3: a (B, T) padding mask has the shape of a (T, T) mask. As `key_padding_mask` row b hides
    # batch element b's padding from all its queries; as `mask` row i is query i's pattern in every batch.
    model = _model().eval()
    x = _x(b=3, t=3)
    padding = torch.tensor([[True, True, False], [True, False, True], [True, True, True]])
    per_batch = _formula(model, x, allowed=padding[:, None, :].expand(3, 3, 3))
    per_query = _formula(model, x, allowed=padding[None, :, :].expand(3, 3, 3))
    assert (_out(model(x, key_padding_mask=padding, need_weights=need_weights)) - per_batch).abs().max() < FP64_TOL
    assert (_out(model(x, mask=padding, need_weights=need_weights)) - per_query).abs().max() < FP64_TOL
    assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"
