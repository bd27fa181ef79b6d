"""mechanisms/cross_attention.py against torch.nn.MultiheadAttention(kdim=, vdim=) with copied weights.

x and context deliberately differ in width (d_model 12 vs context_dim 7) and length (Tq 4 vs Tk 6): the
seed projects' cross-attention failed exactly there.
"""
import copy

import pytest
import torch
import torch.nn as nn

from mechanisms.cross_attention import CrossAttention

FP64_TOL = 1e-10
FP32_TOL = 1e-5
D, C, H = 12, 7, 3


def _model(d_model=D, context_dim=C, num_heads=H, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = CrossAttention(d_model, context_dim, num_heads, **kwargs).to(dtype)
    with torch.no_grad():  # non-zero biases, so that a dropped bias would be noticed
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def _torch_copy(model):
    """nn.MultiheadAttention(kdim, vdim) holding exactly `model`'s weights."""
    bias = model.q_proj.bias is not None
    ref = nn.MultiheadAttention(model.d_model, model.num_heads, bias=bias, kdim=model.context_dim,
                                vdim=model.context_dim, batch_first=True, dtype=model.q_proj.weight.dtype)
    with torch.no_grad():
        ref.q_proj_weight.copy_(model.q_proj.weight)
        ref.k_proj_weight.copy_(model.k_proj.weight)
        ref.v_proj_weight.copy_(model.v_proj.weight)
        ref.out_proj.weight.copy_(model.out_proj.weight)
        if bias:
            ref.in_proj_bias.copy_(torch.cat([model.q_proj.bias, model.k_proj.bias, model.v_proj.bias]))
            ref.out_proj.bias.copy_(model.out_proj.bias)
    return ref.eval()


def _inputs(b=2, tq=4, tk=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, tq, D, generator=g, dtype=dtype), torch.randn(b, tk, C, generator=g, dtype=dtype)


def _random_mask(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.4
    mask[..., 0] = True  # every query keeps a key (PyTorch's module gives NaN otherwise)
    return mask


def _out(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_matches_torch_multihead_attention_with_kdim_vdim(need_weights, bias, dtype, tol):
    model = _model(bias=bias, dtype=dtype).eval()
    x, context = _inputs(dtype=dtype)
    expected, expected_w = _torch_copy(model)(x, context, context, average_attn_weights=False)
    ours = model(x, context, need_weights=need_weights)
    assert (_out(ours) - expected).abs().max() < tol
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < tol


@pytest.mark.parametrize("need_weights", [False, True])
def test_masks_match_torch(need_weights):
    model = _model().eval()
    x, context = _inputs()
    padding = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    expected, _ = _torch_copy(model)(x, context, context, key_padding_mask=~padding)
    ours = model(x, context, mask=padding[:, None, None, :], need_weights=need_weights)
    assert (_out(ours) - expected).abs().max() < FP64_TOL
    full = _random_mask((2, H, 4, 6))
    expected, _ = _torch_copy(model)(x, context, context, attn_mask=~full.reshape(2 * H, 4, 6))
    assert (_out(model(x, context, mask=full, need_weights=need_weights)) - expected).abs().max() < FP64_TOL


def test_fused_path_equals_explicit_path():
    model = _model(dtype=torch.float32).eval()
    x, context = _inputs(dtype=torch.float32)
    mask = _random_mask((2, 1, 4, 6))
    mask[1, 0, 3] = False  # and one fully masked row
    for kwargs in ({}, {"mask": mask}):
        fused = model(x, context, **kwargs)
        assert (fused - model(x, context, need_weights=True, **kwargs)[0]).abs().max() < FP32_TOL, kwargs


def test_with_context_equal_to_x_it_is_multi_head_self_attention():
    # Limit case: context_dim = d_model and context = x. Plain multi-head self-attention, built here from the
    # same four weight matrices, must agree.
    model = _model(context_dim=D).eval()
    x, _ = _inputs()
    ref = nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([model.q_proj.weight, model.k_proj.weight, model.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([model.q_proj.bias, model.k_proj.bias, model.v_proj.bias]))
        ref.out_proj.weight.copy_(model.out_proj.weight)
        ref.out_proj.bias.copy_(model.out_proj.bias)
    self_attention, _ = ref(x, x, x)
    assert (model(x, x) - self_attention).abs().max() < FP64_TOL
    # DISTINCT: with a real context the same weights give a different answer from self-attention over x.
    other = torch.randn(2, 6, D, dtype=torch.float64)
    assert (model(x, other) - self_attention).abs().max() > 1e-3


def test_each_query_row_reads_only_its_own_token_and_the_context():
    # Unlike self-attention, changing token j of x leaves every other row of the output unchanged, while
    # changing the context changes every row.
    model = _model().eval()
    x, context = _inputs()
    out = model(x, context)
    x2 = x.clone()
    x2[:, 1] = torch.randn(2, D, dtype=torch.float64)
    out2 = model(x2, context)
    assert torch.allclose(out2[:, [0, 2, 3]], out[:, [0, 2, 3]], atol=1e-12)
    assert not torch.allclose(out2[:, 1], out[:, 1])
    context2 = context.clone()
    context2[:, 5] += 1.0
    assert ((model(x, context2) - out).abs().amax(dim=-1) > 1e-6).all()


@pytest.mark.parametrize("need_weights", [False, True])
def test_masked_context_tokens_get_zero_weight_and_do_not_matter(need_weights):
    model = _model().eval()
    x, context = _inputs()
    mask = torch.tensor([True, False, True, True, False, True])[None, None, None, :]
    out = _out(model(x, context, mask=mask, need_weights=need_weights))
    context2 = context.clone()
    context2[:, [1, 4]] = torch.randn(2, 2, C, dtype=torch.float64) * 10
    assert torch.allclose(_out(model(x, context2, mask=mask, need_weights=need_weights)), out, atol=1e-12)
    _, weights = model(x, context, mask=mask, need_weights=True)
    assert (weights[..., [1, 4]] == 0).all()


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_row_gives_zeros_not_nan(need_weights, dtype):
    model = _model(dtype=dtype, bias=False)  # without the output bias "zeros before W^O" is zeros after it
    x, context = (t.requires_grad_() for t in _inputs(dtype=dtype))
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1] = False  # the second context is entirely padding
    result = model(x, context, mask=mask, need_weights=need_weights)
    out = _out(result)
    assert not out.isnan().any()
    assert (out[1] == 0).all()
    if need_weights:
        assert (result[1][1] == 0).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(context.grad).all()


def test_gradcheck():
    model = _model(d_model=4, context_dim=3, num_heads=2)
    x = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    context = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: model(a, c, need_weights=True)[0], (x, context))
    assert torch.autograd.gradcheck(lambda a, c: model(a, c), (x, context))


def test_every_parameter_receives_a_nonzero_gradient():
    model = _model()
    x, context = _inputs()
    model(x, context, mask=_random_mask((2, 1, 4, 6))).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_every_constructor_argument_changes_the_output():
    base = _model(d_model=D).eval()
    x, context = _inputs()
    out = base(x, context)
    two_heads = CrossAttention(D, C, 2).to(torch.float64).eval()
    two_heads.load_state_dict(base.state_dict())
    assert (two_heads(x, context) - out).abs().max() > 1e-3, "num_heads"
    no_bias = CrossAttention(D, C, H, bias=False).to(torch.float64).eval()
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(x, context) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    torch.manual_seed(0)
    assert (dropped(x, context) - out).abs().max() > 1e-3, "dropout"
    # context_dim and d_model set the widths the module accepts and returns.
    assert _model(context_dim=5)(x, context[..., :5]).shape == (2, 4, D), "context_dim"
    assert _model(d_model=6)(x[..., :6], context).shape == (2, 4, 6), "d_model"


def test_dropout_is_off_in_eval():
    with_dropout, without = _model(dropout=0.5).eval(), _model(dropout=0.0).eval()
    x, context = _inputs()
    for need_weights in (False, True):
        first = _out(with_dropout(x, context, need_weights=need_weights))
        assert torch.equal(first, _out(with_dropout(x, context, need_weights=need_weights)))
        assert torch.equal(first, _out(without(x, context, need_weights=need_weights)))


def test_weights_are_taken_before_dropout_and_rows_sum_to_one():
    model = _model(dropout=0.5)
    x, context = _inputs()
    _, clean = model.eval()(x, context, need_weights=True)
    torch.manual_seed(0)
    out_train, weights = model.train()(x, context, need_weights=True)
    assert not torch.allclose(out_train, model.eval()(x, context)), "dropout did nothing in training"
    assert torch.equal(weights, clean), "returned weights were changed by dropout"
    assert weights.shape == (2, H, 4, 6)
    assert torch.allclose(weights.sum(-1), torch.ones(2, H, 4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_close_to_float32(dtype):
    x, context = _inputs(dtype=torch.float32)
    model = _model(dtype=torch.float32).eval()
    reference = model(x, context)
    low = copy.deepcopy(model).to(dtype)  # the same weights, rounded
    for need_weights in (False, True):
        out = _out(low(x.to(dtype), context.to(dtype), need_weights=need_weights))
        assert out.dtype == dtype
        assert (out.float() - reference).abs().max() < 0.1


def test_bad_input_raises_clear_errors():
    model = _model()
    x, context = _inputs()
    with pytest.raises(ValueError, match="x"):
        model(x[0], context)  # wrong rank
    with pytest.raises(ValueError, match="d_model"):
        model(x[..., :8], context)  # mismatched d_model
    with pytest.raises(ValueError, match="context_dim"):
        model(x, torch.randn(2, 6, D, dtype=torch.float64))  # context of width d_model, not context_dim
    with pytest.raises(ValueError, match="num_heads"):
        CrossAttention(10, C, 3)
    with pytest.raises(ValueError, match="context"):
        model(x, context[:1])  # batch mismatch between query and key sequences
    with pytest.raises(ValueError, match=r"mask.*\(2, 1, 1, 6\)"):
        model(x, context, mask=torch.ones(2, 6, dtype=torch.bool))  # (B, Tk): suggests (B, 1, 1, Tk)
    with pytest.raises(ValueError, match="mask"):
        model(x, context, mask=torch.ones(4, 4, dtype=torch.bool))  # (Tq, Tq) is not (Tq, Tk)
    with pytest.raises(TypeError, match="mask"):
        model(x, context, mask=torch.ones(2, 1, 1, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="context_dim"):
        CrossAttention(D, 0, H)
