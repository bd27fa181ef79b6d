"""mechanisms/multi_head_attention.py against torch.nn.MultiheadAttention with copied weights.

PyTorch's module takes masks of the opposite polarity (True = blocked): a (B, H, Tq, Tk) mask becomes
`attn_mask=~mask.reshape(B * H, Tq, Tk)` and a (B, 1, 1, Tk) padding mask `key_padding_mask=~mask[:, 0, 0]`.
"""

import pytest
import torch

from mechanisms.multi_head_attention import MultiHeadAttention
from tests.oracles import mha_reference, output_of, random_inputs, random_mask, randomize_, torch_mha_like

FP64_TOL = 1e-10
FP32_TOL = 1e-5
D, H = 12, 3


def _model(d_model=D, num_heads=H, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(MultiHeadAttention(d_model, num_heads, **kwargs).to(dtype))


def _inputs(b=2, tq=4, tk=6, dtype=torch.float64, seed=1):
    return random_inputs(b, (tq, tk, tk), D, seed=seed, dtype=dtype)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_matches_torch_multihead_attention(need_weights, bias, dtype, tol):
    model = _model(bias=bias, dtype=dtype).eval()
    ref = torch_mha_like(model)
    q, k, v = _inputs(dtype=dtype)
    for args in ((q, k, v), (q, q, q)):  # cross-sequence and self-attention
        ours = model(*args, need_weights=need_weights)
        expected, expected_w = ref(*args, need_weights=True, average_attn_weights=False)
        diff = (output_of(ours) - expected).abs().max()
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
    mask = random_mask((2, H, 4, 6))
    expected, expected_w = mha_reference(model, q, k, v, mask=mask)
    ours = model(q, k, v, mask=mask, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < tol
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < tol


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_matches_torch_even_when_batch_equals_tq(need_weights):
    # B == Tq == 2: a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. As `key_padding_mask` it is
    # read per batch element (PyTorch's key_padding_mask, negated polarity); as `mask` it is read per query
    # row (PyTorch's attn_mask). The two readings differ, and each matches its PyTorch counterpart.
    model = _model().eval()
    q, k, v = _inputs(tq=2)
    padding = torch.tensor([[True, True, True, True, False, False], [True, False, True, True, True, True]])
    expected, _ = torch_mha_like(model)(q, k, v, key_padding_mask=~padding)
    ours = output_of(model(q, k, v, key_padding_mask=padding, need_weights=need_weights))
    assert (ours - expected).abs().max() < FP64_TOL
    four_d = output_of(model(q, k, v, mask=padding[:, None, None, :], need_weights=need_weights))
    assert (four_d - expected).abs().max() < FP64_TOL, "the (B, 1, 1, Tk) mask form still works"
    as_rows, _ = torch_mha_like(model)(q, k, v, attn_mask=~padding)
    assert (output_of(model(q, k, v, mask=padding, need_weights=need_weights)) - as_rows).abs().max() < FP64_TOL
    assert (ours - as_rows).abs().max() > 1e-3, "the two readings should differ on this input"


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_matches_torch_with_explicit_mask(need_weights):
    model = _model().eval()
    q, _, _ = _inputs(tq=5)
    blocked = torch.ones(5, 5, dtype=torch.bool).triu(diagonal=1)  # True = blocked, PyTorch's polarity
    expected, _ = torch_mha_like(model)(q, q, q, attn_mask=blocked)
    assert (output_of(model(q, is_causal=True, need_weights=need_weights)) - expected).abs().max() < FP64_TOL


def test_rectangular_causal_is_aligned_bottom_right():
    # Tq = 2 queries are the last two of Tk = 6 positions: query i sees keys j <= i + 4.
    model = _model().eval()
    q, k, v = _inputs(tq=2, tk=6)
    blocked = torch.tensor([[j > i + 4 for j in range(6)] for i in range(2)])
    expected, _ = torch_mha_like(model)(q, k, v, attn_mask=blocked)
    for need_weights in (False, True):
        assert (output_of(model(q, k, v, is_causal=True, need_weights=need_weights)) - expected).abs().max() < FP64_TOL


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
