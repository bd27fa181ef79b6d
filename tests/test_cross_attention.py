"""mechanisms/cross_attention.py against torch.nn.MultiheadAttention(kdim=, vdim=) with copied weights.

x and context deliberately differ in width (d_model 12 vs context_dim 7) and length (Tq 4 vs Tk 6): the
seed projects' cross-attention failed exactly there.
"""

import pytest
import torch

from mechanisms.cross_attention import CrossAttention
from tests.oracles import mha_reference, output_of, random_inputs, random_mask, randomize_

FP64_TOL = 1e-10
FP32_TOL = 1e-5
D, C, H = 12, 7, 3


def _model(d_model=D, context_dim=C, num_heads=H, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, so that a dropped bias would be noticed
    return randomize_(CrossAttention(d_model, context_dim, num_heads, **kwargs).to(dtype))


def _inputs(b=2, tq=4, tk=6, dtype=torch.float64, seed=1):
    return random_inputs(b, (tq, tk), (D, C), seed=seed, dtype=dtype)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)])
def test_matches_torch_multihead_attention_with_kdim_vdim(need_weights, bias, dtype, tol):
    model = _model(bias=bias, dtype=dtype).eval()
    x, context = _inputs(dtype=dtype)
    expected, expected_w = mha_reference(model, x, context)  # nn.MultiheadAttention(kdim=, vdim=)
    ours = model(x, context, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < tol
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < tol


@pytest.mark.parametrize("need_weights", [False, True])
def test_masks_match_torch(need_weights):
    model = _model().eval()
    x, context = _inputs()
    padding = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    expected, _ = mha_reference(model, x, context, key_padding_mask=padding)
    ours = model(x, context, key_padding_mask=padding, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < FP64_TOL
    ours = model(x, context, mask=padding[:, None, None, :], need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < FP64_TOL, "the (B, 1, 1, Tk) mask form still works"
    full = random_mask((2, H, 4, 6))
    expected, _ = mha_reference(model, x, context, mask=full)
    assert (output_of(model(x, context, mask=full, need_weights=need_weights)) - expected).abs().max() < FP64_TOL


def test_with_context_equal_to_x_it_is_multi_head_self_attention():
    # Limit case: context_dim = d_model and context = x. Plain multi-head self-attention, built here from the
    # same four weight matrices, must agree.
    model = _model(context_dim=D).eval()
    x, _ = _inputs()
    self_attention, _ = mha_reference(model, x)
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


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq(need_weights):
    # B == Tq == 4: a (B, Tk) context-padding mask has the shape of a (Tq, Tk) mask. As `key_padding_mask`
    # it is read per batch element (PyTorch's key_padding_mask); as `mask`, per query row (attn_mask).
    model = _model().eval()
    x, context = _inputs(b=4, tq=4)
    padding = random_mask((4, 6), seed=5)
    per_batch, _ = mha_reference(model, x, context, key_padding_mask=padding)
    per_query, _ = mha_reference(model, x, context, mask=padding)
    ours = output_of(model(x, context, key_padding_mask=padding, need_weights=need_weights))
    assert (ours - per_batch).abs().max() < FP64_TOL
    assert (output_of(model(x, context, mask=padding, need_weights=need_weights)) - per_query).abs().max() < FP64_TOL
    assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"
