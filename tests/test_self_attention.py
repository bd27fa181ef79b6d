"""mechanisms/self_attention.py against the explicit formula and torch.nn.MultiheadAttention(num_heads=1).

SelfAttention has no output projection, so PyTorch's module gets the same W_Q, W_K, W_V and an identity
output projection with zero bias.
"""
import math

import pytest
import torch

from mechanisms.self_attention import SelfAttention
from tests.oracles import output_of, random_inputs, random_mask, randomize_, torch_mha_like

FP64_TOL = 1e-10
FP32_TOL = 1e-5
D = 8


def _model(d_model=D, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(SelfAttention(d_model, **kwargs).to(dtype))


def _torch_copy(model, num_heads=1):
    """nn.MultiheadAttention with `model`'s W_Q, W_K, W_V and an identity output projection."""
    return torch_mha_like(model, num_heads=num_heads, identity_out_proj=True)


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
    return random_inputs(b, t, D, seed=seed, dtype=dtype)


@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_the_formula_written_out(need_weights):
    model = _model().eval()
    x = _x()
    with torch.no_grad():
        assert (output_of(model(x, need_weights=need_weights)) - _formula(model, x)).abs().max() < FP64_TOL
        allowed = torch.ones(2, 5, 5, dtype=torch.bool).tril()
        assert (output_of(model(x, is_causal=True, need_weights=need_weights))
                - _formula(model, x, allowed)).abs().max() < FP64_TOL


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_matches_torch_multihead_attention_with_one_head(need_weights, bias, dtype, tol):
    model = _model(bias=bias, dtype=dtype).eval()
    x = _x(dtype=dtype)
    mask = random_mask((2, 1, 5, 5))  # every query keeps a key (PyTorch gives NaN otherwise)
    expected, expected_w = _torch_copy(model)(x, x, x, attn_mask=~mask[:, 0], average_attn_weights=False)
    ours = model(x, mask=mask, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < tol
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
    assert (output_of(model(x, key_padding_mask=padding, need_weights=need_weights)) - per_batch).abs().max() < FP64_TOL
    assert (output_of(model(x, mask=padding, need_weights=need_weights)) - per_query).abs().max() < FP64_TOL
    assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"
