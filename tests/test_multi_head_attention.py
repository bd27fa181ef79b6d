"""mechanisms/multi_head_attention.py against torch.nn.MultiheadAttention with copied weights.

PyTorch's module takes masks of the opposite polarity (True = blocked): a (B, H, Tq, Tk) mask becomes
`attn_mask=~mask.reshape(B * H, Tq, Tk)` and a (B, 1, 1, Tk) padding mask `key_padding_mask=~mask[:, 0, 0]`.
"""
import copy

import pytest
import torch
import torch.nn as nn

from mechanisms.multi_head_attention import MultiHeadAttention

FP64_TOL = 1e-10
FP32_TOL = 1e-5
D, H = 12, 3


def _model(d_model=D, num_heads=H, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = MultiHeadAttention(d_model, num_heads, **kwargs).to(dtype)
    with torch.no_grad():  # non-zero biases, so that a dropped bias would be noticed
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def _torch_copy(model):
    """nn.MultiheadAttention holding exactly `model`'s weights."""
    bias = model.q_proj.bias is not None
    ref = nn.MultiheadAttention(model.d_model, model.num_heads, bias=bias, batch_first=True,
                                dtype=model.q_proj.weight.dtype)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([model.q_proj.weight, model.k_proj.weight, model.v_proj.weight]))
        ref.out_proj.weight.copy_(model.out_proj.weight)
        if bias:
            ref.in_proj_bias.copy_(torch.cat([model.q_proj.bias, model.k_proj.bias, model.v_proj.bias]))
            ref.out_proj.bias.copy_(model.out_proj.bias)
    return ref.eval()


def _inputs(b=2, tq=4, tk=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, tq, D, generator=g, dtype=dtype), torch.randn(b, tk, D, generator=g, dtype=dtype),
            torch.randn(b, tk, D, generator=g, dtype=dtype))


def _random_mask(shape, seed=2):
    """Random boolean mask, every query row keeping at least one key (PyTorch's module gives NaN otherwise)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.4
    mask[..., 0] = True
    return mask


def _out(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_matches_torch_multihead_attention(need_weights, bias, dtype, tol):
    model = _model(bias=bias, dtype=dtype).eval()
    ref = _torch_copy(model)
    q, k, v = _inputs(dtype=dtype)
    for args in ((q, k, v), (q, q, q)):  # cross-sequence and self-attention
        ours = model(*args, need_weights=need_weights)
        expected, expected_w = ref(*args, need_weights=True, average_attn_weights=False)
        diff = (_out(ours) - expected).abs().max()
        assert diff < tol, f"output differs by {diff} > {tol}"
        if need_weights:
            assert (ours[1] - expected_w).abs().max() < tol, "weights differ"


def test_key_and_value_default_to_query():
    model = _model().eval()
    q, _, _ = _inputs()
    assert torch.equal(model(q), model(q, q, q))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_full_mask_matches_torch_attn_mask(need_weights, dtype, tol):
    model = _model(dtype=dtype).eval()
    q, k, v = _inputs(dtype=dtype)
    mask = _random_mask((2, H, 4, 6))
    expected, expected_w = _torch_copy(model)(q, k, v, attn_mask=~mask.reshape(2 * H, 4, 6),
                                              average_attn_weights=False)
    ours = model(q, k, v, mask=mask, need_weights=need_weights)
    assert (_out(ours) - expected).abs().max() < tol
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < tol


@pytest.mark.parametrize("need_weights", [False, True])
def test_padding_mask_matches_torch_key_padding_mask(need_weights):
    model = _model().eval()
    q, k, v = _inputs()
    mask = torch.tensor([[True, True, True, True, False, False], [True, True, True, True, True, False]])
    expected, _ = _torch_copy(model)(q, k, v, key_padding_mask=~mask)
    ours = model(q, k, v, mask=mask[:, None, None, :], need_weights=need_weights)
    assert (_out(ours) - expected).abs().max() < FP64_TOL


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_matches_torch_with_explicit_mask(need_weights):
    model = _model().eval()
    q, _, _ = _inputs(tq=5)
    blocked = torch.ones(5, 5, dtype=torch.bool).triu(diagonal=1)  # True = blocked, PyTorch's polarity
    expected, _ = _torch_copy(model)(q, q, q, attn_mask=blocked)
    assert (_out(model(q, is_causal=True, need_weights=need_weights)) - expected).abs().max() < FP64_TOL


def test_rectangular_causal_is_aligned_bottom_right():
    # Tq = 2 queries are the last two of Tk = 6 positions: query i sees keys j <= i + 4.
    model = _model().eval()
    q, k, v = _inputs(tq=2, tk=6)
    blocked = torch.tensor([[j > i + 4 for j in range(6)] for i in range(2)])
    expected, _ = _torch_copy(model)(q, k, v, attn_mask=blocked)
    for need_weights in (False, True):
        assert (_out(model(q, k, v, is_causal=True, need_weights=need_weights)) - expected).abs().max() < FP64_TOL


def test_fused_path_equals_explicit_path():
    model = _model(dtype=torch.float32).eval()
    q, k, v = _inputs(dtype=torch.float32)
    mask = _random_mask((2, 1, 4, 6))
    mask[1, 0, 3] = False  # and one fully masked row
    for kwargs in ({}, {"mask": mask}, {"is_causal": True}, {"mask": mask, "is_causal": True}):
        fused = model(q, k, v, **kwargs)
        explicit, _ = model(q, k, v, need_weights=True, **kwargs)
        assert (fused - explicit).abs().max() < FP32_TOL, kwargs


@pytest.mark.parametrize("need_weights", [False, True])
def test_masked_keys_get_zero_weight_and_their_values_do_not_matter(need_weights):
    model = _model().eval()
    q, k, v = _inputs()
    mask = torch.tensor([True, False, True, True, False, True])[None, None, None, :]
    out = _out(model(q, k, v, mask=mask, need_weights=need_weights))
    k2, v2 = k.clone(), v.clone()
    k2[:, [1, 4]] = torch.randn(2, 2, D, dtype=torch.float64) * 10
    v2[:, [1, 4]] = torch.randn(2, 2, D, dtype=torch.float64) * 10
    assert torch.allclose(_out(model(q, k2, v2, mask=mask, need_weights=need_weights)), out, atol=1e-12)
    _, weights = model(q, k, v, mask=mask, need_weights=True)
    assert (weights[..., [1, 4]] == 0).all()


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_future_tokens_do_not_change_earlier_outputs(need_weights):
    model = _model().eval()
    x, _, _ = _inputs(tq=6)
    out = _out(model(x, is_causal=True, need_weights=need_weights))
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, D, dtype=torch.float64)
    out2 = _out(model(x2, is_causal=True, need_weights=need_weights))
    assert torch.allclose(out2[:, :4], out[:, :4], atol=1e-12)
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_row_gives_zeros_not_nan(need_weights, dtype):
    # The output of a query that sees nothing is zero BEFORE the output projection, so the module returns
    # the output projection's bias there. With bias=False that is exactly zero.
    model = _model(dtype=dtype, bias=False)
    q, k, v = (t.requires_grad_() for t in _inputs(dtype=dtype))
    mask = _random_mask((2, H, 4, 6))
    mask[0, :, 2] = False  # query 2 of batch element 0 sees no key in any head
    result = model(q, k, v, mask=mask, need_weights=need_weights)
    out = _out(result)
    assert not out.isnan().any()
    assert (out[0, 2] == 0).all()
    if need_weights:
        assert (result[1][0, :, 2] == 0).all()
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradcheck():
    model = _model(d_model=4, num_heads=2)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: model(t, is_causal=True, need_weights=True)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: model(t, is_causal=True), (x,))


def test_every_parameter_receives_a_nonzero_gradient():
    model = _model()
    q, k, v = _inputs()
    model(q, k, v, mask=_random_mask((2, 1, 4, 6))).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_every_constructor_argument_changes_the_output():
    base = _model().eval()
    q, k, v = _inputs()
    out = base(q, k, v)
    # num_heads: the same four weight matrices, cut into 2 heads instead of 3 (d_model 12 is divisible by both).
    two_heads = MultiHeadAttention(D, 2).to(torch.float64).eval()
    two_heads.load_state_dict(base.state_dict())
    assert (two_heads(q, k, v) - out).abs().max() > 1e-3, "num_heads"
    # bias: the same matrices without the biases.
    no_bias = MultiHeadAttention(D, H, bias=False).to(torch.float64).eval()
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(q, k, v) - out).abs().max() > 1e-3, "bias"
    # dropout: in training mode it changes the output.
    dropped = _model(dropout=0.5).train()
    torch.manual_seed(0)
    assert (dropped(q, k, v) - out).abs().max() > 1e-3, "dropout"
    # d_model: sets the width of everything; a different value gives a different output shape.
    assert _model(d_model=6)(q[..., :6]).shape == (2, 4, 6)


def test_dropout_is_off_in_eval():
    with_dropout = _model(dropout=0.5).eval()
    without = _model(dropout=0.0).eval()
    q, k, v = _inputs()
    for need_weights in (False, True):
        first = _out(with_dropout(q, k, v, need_weights=need_weights))
        assert torch.equal(first, _out(with_dropout(q, k, v, need_weights=need_weights)))
        assert torch.equal(first, _out(without(q, k, v, need_weights=need_weights)))


def test_weights_are_taken_before_dropout_and_rows_sum_to_one():
    model = _model(dropout=0.5)
    q, k, v = _inputs()
    mask = _random_mask((2, 1, 4, 6))
    _, clean = model.eval()(q, k, v, mask=mask, need_weights=True)
    torch.manual_seed(0)
    out_train, weights = model.train()(q, k, v, mask=mask, need_weights=True)
    assert not torch.allclose(out_train, model.eval()(q, k, v, mask=mask)), "dropout did nothing in training"
    assert torch.equal(weights, clean), "returned weights were changed by dropout"
    assert weights.shape == (2, H, 4, 6)
    assert torch.allclose(weights.sum(-1), torch.ones(2, H, 4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_close_to_float32(dtype):
    model = _model(dtype=torch.float32).eval()
    q, k, v = _inputs(dtype=torch.float32)
    reference = model(q, k, v, is_causal=True)
    low = copy.deepcopy(model).to(dtype)  # the same weights, rounded
    for need_weights in (False, True):
        out = _out(low(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True, need_weights=need_weights))
        assert out.dtype == dtype
        assert (out.float() - reference).abs().max() < 0.1


def test_bad_input_raises_clear_errors():
    model = _model()
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="query"):
        model(q[0])  # wrong rank
    with pytest.raises(ValueError, match="d_model"):
        model(q[..., :8])  # mismatched d_model
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="d_model"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="key"):
        model(q, k[:1], v[:1])  # batch mismatch between query and key
    with pytest.raises(ValueError, match="value"):
        model(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"mask.*\(2, 1, 1, 6\)"):
        model(q, k, v, mask=torch.ones(2, 6, dtype=torch.bool))  # (B, Tk): suggests (B, 1, 1, Tk)
    with pytest.raises(ValueError, match="mask"):
        model(q, k, v, mask=torch.ones(2, 2, 4, 6, dtype=torch.bool))  # 2 heads, not 3
    with pytest.raises(TypeError, match="mask"):
        model(q, k, v, mask=torch.ones(2, 1, 1, 6))
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(D, H, dropout=1.5)
