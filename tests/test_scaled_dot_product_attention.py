"""mechanisms/scaled_dot_product_attention.py against torch.nn.functional.scaled_dot_product_attention.

Both paths of the function are checked (need_weights=False takes PyTorch's fused kernel,
need_weights=True the explicit formula), so every oracle test is parametrised over `need_weights`.
"""
import pytest
import torch
import torch.nn.functional as F

from mechanisms.scaled_dot_product_attention import scaled_dot_product_attention as sdpa
from tests.oracles import random_mask

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
    mask = random_mask(mask_shape, seed=1)  # every query row keeps a key (the oracle would give NaN)
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
        "mask": sdpa(q, k, v, mask=random_mask((6, 6), seed=1)),
        "key_padding_mask": sdpa(q, k, v, key_padding_mask=random_mask((2, 6), seed=1)),
        "is_causal": sdpa(q, k, v, is_causal=True),
        "dropout_p": sdpa(q, k, v, dropout_p=0.5),
        "scale": sdpa(q, k, v, scale=2.0),
    }
    for name, out in variants.items():
        assert (out - base).abs().max() > 1e-3, f"{name} did not change the output"


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq(need_weights):
    # B == Tq == 4: a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. Passed as `mask` it is read as
    # (Tq, Tk), row i for query i (the documented convention); passed as `key_padding_mask` it is read as
    # (B, Tk), row b for batch element b. The oracle is PyTorch's kernel with the (B, 1, 1, Tk) mask.
    q, k, v = _qkv(b=4, tq=4, tk=6)
    padding = random_mask((4, 6), seed=3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=padding[:, None, None, :])
    ours = _run(q, k, v, need_weights, key_padding_mask=padding)
    assert (ours - expected).abs().max() < FP64_TOL
    as_rows = F.scaled_dot_product_attention(q, k, v, attn_mask=padding)  # the (Tq, Tk) reading
    assert (_run(q, k, v, need_weights, mask=padding) - as_rows).abs().max() < FP64_TOL
    assert (ours - as_rows).abs().max() > 1e-3, "the two readings should differ on this input"


def test_mask_key_padding_mask_and_is_causal_combine_by_and():
    q, k, v = _qkv(tq=5, tk=5)
    mask = random_mask((2, 3, 5, 5), seed=4)
    padding = torch.tensor([[True, True, False, True, True], [True, False, True, True, False]])
    allowed = mask & padding[:, None, None, :] & torch.ones(5, 5, dtype=torch.bool).tril()
    allowed[..., 0] = True  # column 0 is visible in all three, so no row is empty for the oracle
    ours = sdpa(q, k, v, mask=mask, key_padding_mask=padding, is_causal=True)
    assert (ours - F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)).abs().max() < FP64_TOL
