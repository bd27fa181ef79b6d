"""mechanisms/self_attention.py against the explicit formula and torch.nn.MultiheadAttention(num_heads=1).

SelfAttention has no output projection, so PyTorch's module gets the same W_Q, W_K, W_V and an identity
output projection with zero bias.
"""
import copy
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


def test_fused_path_equals_explicit_path():
    model = _model(dtype=torch.float32).eval()
    x = _x(dtype=torch.float32)
    mask = _random_mask((2, 1, 5, 5))
    mask[1, 0, 3] = False  # and one fully masked row
    for kwargs in ({}, {"mask": mask}, {"is_causal": True}, {"mask": mask, "is_causal": True}):
        assert (model(x, **kwargs) - model(x, need_weights=True, **kwargs)[0]).abs().max() < FP32_TOL, kwargs


def test_distinct_from_multi_head_attention_with_the_same_weights():
    # Cutting the same W_Q, W_K, W_V into two heads (plain MHA, identity output) gives a different answer:
    # one head of width d_model is not H heads of width d_model / H.
    model = _model().eval()
    x = _x()
    two_heads, _ = _torch_copy(model, num_heads=2)(x, x, x)
    one_head, _ = _torch_copy(model, num_heads=1)(x, x, x)
    assert (model(x) - one_head).abs().max() < FP64_TOL
    assert (model(x) - two_heads).abs().max() > 1e-3


@pytest.mark.parametrize("need_weights", [False, True])
def test_masked_keys_get_zero_weight_and_their_values_do_not_matter(need_weights):
    model = _model().eval()
    x = _x()
    mask = torch.tensor([True, False, True, True, False])[None, None, None, :]
    out = _out(model(x, mask=mask, need_weights=need_weights))
    x2 = x.clone()
    x2[:, [1, 4]] = torch.randn(2, 2, D, dtype=torch.float64) * 10
    out2 = _out(model(x2, mask=mask, need_weights=need_weights))
    keep = [0, 2, 3]  # rows 1 and 4 changed their own query, so only the other rows must be unchanged
    assert torch.allclose(out2[:, keep], out[:, keep], atol=1e-12)
    _, weights = model(x, mask=mask, need_weights=True)
    assert (weights[..., [1, 4]] == 0).all()


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_future_tokens_do_not_change_earlier_outputs(need_weights):
    model = _model().eval()
    x = _x(t=6)
    out = _out(model(x, is_causal=True, need_weights=need_weights))
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, D, dtype=torch.float64)
    out2 = _out(model(x2, is_causal=True, need_weights=need_weights))
    assert torch.allclose(out2[:, :4], out[:, :4], atol=1e-12)
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_row_gives_zeros_not_nan(need_weights, dtype):
    model = _model(dtype=dtype)
    x = _x(dtype=dtype).requires_grad_()
    mask = _random_mask((2, 1, 5, 5))
    mask[0, 0, 2] = False
    result = model(x, mask=mask, need_weights=need_weights)
    out = _out(result)
    assert not out.isnan().any()
    assert (out[0, 2] == 0).all()
    if need_weights:
        assert (result[1][0, 0, 2] == 0).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradcheck():
    model = _model(d_model=4)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: model(t, is_causal=True, need_weights=True)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: model(t), (x,))


def test_every_parameter_receives_a_nonzero_gradient():
    model = _model()
    model(_x(), mask=_random_mask((2, 1, 1, 5))).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


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


def test_dropout_is_off_in_eval():
    with_dropout, without = _model(dropout=0.5).eval(), _model(dropout=0.0).eval()
    x = _x()
    for need_weights in (False, True):
        first = _out(with_dropout(x, need_weights=need_weights))
        assert torch.equal(first, _out(with_dropout(x, need_weights=need_weights)))
        assert torch.equal(first, _out(without(x, need_weights=need_weights)))


def test_weights_are_taken_before_dropout_and_rows_sum_to_one():
    model = _model(dropout=0.5)
    x = _x()
    _, clean = model.eval()(x, is_causal=True, need_weights=True)
    torch.manual_seed(0)
    out_train, weights = model.train()(x, is_causal=True, need_weights=True)
    assert not torch.allclose(out_train, model.eval()(x, is_causal=True)), "dropout did nothing in training"
    assert torch.equal(weights, clean), "returned weights were changed by dropout"
    assert weights.shape == (2, 1, 5, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 1, 5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_close_to_float32(dtype):
    x = _x(dtype=torch.float32)
    model = _model(dtype=torch.float32).eval()
    reference = model(x, is_causal=True)
    low = copy.deepcopy(model).to(dtype)  # the same weights, rounded
    for need_weights in (False, True):
        out = _out(low(x.to(dtype), is_causal=True, need_weights=need_weights))
        assert out.dtype == dtype
        assert (out.float() - reference).abs().max() < 0.1


def test_bad_input_raises_clear_errors():
    model = _model()
    x = _x()
    with pytest.raises(ValueError, match="x"):
        model(x[0])  # wrong rank
    with pytest.raises(ValueError, match="d_model"):
        model(x[..., :6])  # mismatched d_model
    with pytest.raises(ValueError, match="d_model"):
        SelfAttention(0)
    with pytest.raises(ValueError, match=r"mask.*\(2, 1, 1, 5\)"):
        model(x, mask=torch.ones(2, 5, dtype=torch.bool))  # (B, T): suggests (B, 1, 1, T)
    with pytest.raises(ValueError, match="mask"):
        model(x, mask=torch.ones(2, 2, 5, 5, dtype=torch.bool))  # one head, not 2
    with pytest.raises(TypeError, match="mask"):
        model(x, mask=torch.ones(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout"):
        SelfAttention(D, dropout=-0.1)
