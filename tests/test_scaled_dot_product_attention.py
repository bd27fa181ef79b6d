"""mechanisms/scaled_dot_product_attention.py against torch.nn.functional.scaled_dot_product_attention.

Both paths of the function are checked (need_weights=False takes PyTorch's fused kernel,
need_weights=True the explicit formula), so every oracle test is parametrised over `need_weights`.
"""
import pytest
import torch
import torch.nn.functional as F

from mechanisms.scaled_dot_product_attention import scaled_dot_product_attention as sdpa

FP64_TOL = 1e-12  # float64: the two computations differ only by rounding
FP32_TOL = 1e-5


def _run(q, k, v, need_weights, **kwargs):
    """The function's output alone, whichever path is taken."""
    result = sdpa(q, k, v, need_weights=need_weights, **kwargs)
    return result[0] if need_weights else result


def _qkv(b=2, h=3, tq=4, tk=6, dh=5, dv=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, dh, generator=g, dtype=dtype),
            torch.randn(b, h, tk, dh, generator=g, dtype=dtype),
            torch.randn(b, h, tk, dv, generator=g, dtype=dtype))


def _random_mask(shape, seed=1):
    """A random boolean mask whose every query row keeps at least one key (the oracle would give NaN)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.4
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_matches_torch_without_mask(need_weights, dtype, tol):
    q, k, v = _qkv(dtype=dtype)
    diff = (_run(q, k, v, need_weights) - F.scaled_dot_product_attention(q, k, v)).abs().max()
    assert diff < tol, f"max difference {diff} exceeds {tol}"


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_shape", [(2, 3, 4, 6), (2, 1, 1, 6), (1, 3, 4, 1), (4, 6), (1, 6)])
def test_matches_torch_with_a_boolean_mask(need_weights, mask_shape):
    q, k, v = _qkv()
    mask = _random_mask(mask_shape)
    ours = _run(q, k, v, need_weights, mask=mask)
    diff = (ours - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max()
    assert diff < FP64_TOL, f"mask {mask_shape}: max difference {diff} exceeds {FP64_TOL}"


@pytest.mark.parametrize("need_weights", [False, True])
def test_square_causal_matches_torch_is_causal(need_weights):
    q, k, v = _qkv(tq=5, tk=5)
    diff = (_run(q, k, v, need_weights, is_causal=True)
            - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max()
    assert diff < FP64_TOL, f"max difference {diff} exceeds {FP64_TOL}"


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("tq,tk", [(3, 7), (1, 5), (6, 4)])
def test_rectangular_causal_is_aligned_bottom_right(need_weights, tq, tk):
    # F.scaled_dot_product_attention aligns is_causal top-left; the project aligns bottom-right (a KV cache:
    # the queries are the last tq positions). The oracle is PyTorch's kernel with that mask written by hand
    # from its definition, query i at absolute position i + tk - tq seeing keys j <= that position.
    q, k, v = _qkv(tq=tq, tk=tk)
    allowed = torch.tensor([[j <= i + tk - tq for j in range(tk)] for i in range(tq)])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    expected = torch.where(allowed.any(-1, keepdim=True), expected, torch.zeros_like(expected))  # tq > tk rows
    diff = (_run(q, k, v, need_weights, is_causal=True) - expected).abs().max()
    assert diff < FP64_TOL, f"max difference {diff} exceeds {FP64_TOL}"


def test_causal_weights_are_zero_exactly_above_the_shifted_diagonal():
    q, k, v = _qkv(tq=3, tk=7)
    _, weights = sdpa(q, k, v, is_causal=True, need_weights=True)
    for i in range(3):
        for j in range(7):
            visible = j <= i + 4
            assert bool((weights[..., i, j] > 0).all()) == visible, (i, j)
            assert bool((weights[..., i, j] == 0).all()) == (not visible), (i, j)


@pytest.mark.parametrize("need_weights", [False, True])
def test_custom_scale_matches_torch(need_weights):
    q, k, v = _qkv()
    diff = (_run(q, k, v, need_weights, scale=0.3)
            - F.scaled_dot_product_attention(q, k, v, scale=0.3)).abs().max()
    assert diff < FP64_TOL, f"max difference {diff} exceeds {FP64_TOL}"


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = _qkv(dh=16)
    diff = (sdpa(q, k, v) - sdpa(q, k, v, scale=0.25)).abs().max()
    assert diff < FP64_TOL, diff


def test_every_argument_changes_the_output():
    q, k, v = _qkv(tq=6, tk=6)
    base = sdpa(q, k, v)
    torch.manual_seed(0)
    variants = {
        "mask": sdpa(q, k, v, mask=_random_mask((6, 6))),
        "is_causal": sdpa(q, k, v, is_causal=True),
        "dropout_p": sdpa(q, k, v, dropout_p=0.5),
        "scale": sdpa(q, k, v, scale=2.0),
    }
    for name, out in variants.items():
        assert (out - base).abs().max() > 1e-3, f"{name} did not change the output"


@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_statistics(need_weights):
    # With value = identity the output row IS the (dropped) weight row: each entry is either 0 or w / (1 - p),
    # about a fraction p are zero, and the average over many draws is w itself.
    torch.manual_seed(0)
    p, tk, draws = 0.3, 8, 4000
    q = torch.randn(1, 1, 2, 4, dtype=torch.float64)
    k = torch.randn(1, 1, tk, 4, dtype=torch.float64)
    eye = torch.eye(tk, dtype=torch.float64).view(1, 1, tk, tk)
    w = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)  # scale 1 / sqrt(4)
    q, k, eye = q.expand(draws, 1, 2, 4), k.expand(draws, 1, tk, 4), eye.expand(draws, 1, tk, tk)
    out = _run(q, k, eye, need_weights, dropout_p=p)
    kept = out != 0
    assert torch.allclose(out[kept], (w / (1 - p)).expand_as(out)[kept], atol=1e-12), "kept entries not w/(1-p)"
    n = kept.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((1 - kept.double().mean()) - p) < 5 * sigma, "fraction dropped is not p"
    mean = out.mean(dim=0, keepdim=True)
    # each entry's mean is w with standard error w * sqrt(p / ((1 - p) draws)) <= sqrt(p / ((1-p) draws))
    assert (mean - w).abs().max() < 5 * (p / ((1 - p) * draws)) ** 0.5, "dropout changed the expectation"


def test_weights_are_taken_before_dropout_and_rows_sum_to_one():
    q, k, v = _qkv()
    mask = _random_mask((2, 3, 4, 6))
    _, clean = sdpa(q, k, v, mask=mask, need_weights=True)
    torch.manual_seed(0)
    _, weights = sdpa(q, k, v, mask=mask, dropout_p=0.5, need_weights=True)
    assert torch.equal(weights, clean), "returned weights were changed by dropout"
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("need_weights", [False, True])
def test_masked_keys_get_zero_weight_and_their_values_do_not_matter(need_weights):
    q, k, v = _qkv()
    mask = _random_mask((2, 1, 1, 6))
    out = _run(q, k, v, need_weights, mask=mask)
    k2, v2 = k.clone(), v.clone()
    hidden = ~mask.expand(2, 3, 1, 6)[:, :, 0, :]  # (B, H, Tk)
    k2[hidden] = 100.0
    v2[hidden] = -100.0
    assert torch.allclose(_run(q, k2, v2, need_weights, mask=mask), out, atol=1e-12)
    _, weights = sdpa(q, k, v, mask=mask, need_weights=True)
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_future_tokens_do_not_change_earlier_outputs(need_weights):
    q, k, v = _qkv(tq=6, tk=6)
    out = _run(q, k, v, need_weights, is_causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, 4:] = torch.randn_like(t[:, :, 4:])
    out2 = _run(q2, k2, v2, need_weights, is_causal=True)
    assert torch.allclose(out2[:, :, :4], out[:, :, :4], atol=1e-12)
    assert not torch.allclose(out2[:, :, 4:], out[:, :, 4:]), "the changed tokens should change their own rows"


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_row_gives_zeros_not_nan(need_weights, dtype):
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(dtype=torch.float32))
    mask = _random_mask((2, 3, 4, 6))
    mask[0, 1, 2] = False
    result = sdpa(q, k, v, mask=mask, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert not out.isnan().any()
    assert (out[0, 1, 2] == 0).all()
    if need_weights:
        assert (result[1][0, 1, 2] == 0).all()
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), "NaN gradient from a fully masked row"


def test_gradcheck():
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=1, tq=3, tk=3, dh=2, dv=2))
    mask = torch.tensor([[True, False, True], [True, True, False], [False, False, False]])
    assert torch.autograd.gradcheck(lambda a, b, c: sdpa(a, b, c, mask=mask, need_weights=True)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: sdpa(a, b, c, is_causal=True), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need_weights", [False, True])
def test_low_precision_is_close_to_float32(dtype, need_weights):
    q, k, v = _qkv(dtype=torch.float32)
    reference = sdpa(q, k, v, is_causal=True)
    out = _run(q.to(dtype), k.to(dtype), v.to(dtype), need_weights, is_causal=True)
    assert out.dtype == dtype
    assert (out.float() - reference).abs().max() < 5e-2


def test_bad_input_raises_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query"):
        sdpa(q[0], k, v)  # wrong rank
    with pytest.raises(ValueError, match="key"):
        sdpa(q, k[:1], v[:1])  # batch mismatch between query and key
    with pytest.raises(ValueError, match="head_dim"):
        sdpa(q, k[..., :4], v)
    with pytest.raises(ValueError, match="value"):
        sdpa(q, k, v[:, :, :5])  # value length differs from key
    with pytest.raises(ValueError, match=r"mask.*\(2, 6\).*\(2, 1, 1, 6\)"):
        sdpa(q, k, v, mask=torch.ones(2, 6, dtype=torch.bool))  # (B, Tk) key padding without the unsqueeze
    with pytest.raises(ValueError, match="mask"):
        sdpa(q, k, v, mask=torch.ones(2, 3, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        sdpa(q, k, v, mask=torch.ones(3, 4, 6, dtype=torch.bool))  # 3-D is ambiguous
    with pytest.raises(TypeError, match="mask"):
        sdpa(q, k, v, mask=torch.ones(4, 6))
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=1.0)
