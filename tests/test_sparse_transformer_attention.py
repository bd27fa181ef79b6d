"""mechanisms/sparse_transformer_attention.py against dense attention with the paper's pattern masks.

The oracle writes the strided and fixed patterns of Child et al. (2019) as loops over (i, j) and runs plain
causal softmax attention under their union; the factorisation claim (two steps reach every earlier position)
is checked on the masks. The generic checks are the conformance suite's
(tests/conformance/entries/sparse_transformer_attention.py).
"""
import math

import pytest
import torch

from mechanisms.sparse_transformer_attention import SparseTransformerAttention, sparse_transformer_masks
from tests.oracles import load_matching_, mha_reference, random_inputs, randomize_

TOL = 1e-10
D, H = 8, 2


def _model(pattern="strided", stride=3, num_summary=1, d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = SparseTransformerAttention(d_model, num_heads, pattern, stride, num_summary, **kwargs).double()
    return randomize_(model).eval()


def _x(b=2, t=10, seed=1):
    return random_inputs(b, t, D, seed=seed)


def _paper_masks(t, pattern, l, c):
    """A1, A2 of Child et al. (2019), section 4.2, written out as loops (causal: j <= i)."""
    a1 = torch.zeros(t, t, dtype=torch.bool)
    a2 = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        for j in range(i + 1):
            if pattern == "strided":
                a1[i, j] = i - j < l  # "t - s < l": the previous l positions
                a2[i, j] = (i - j) % l == 0  # "(t - s) mod l = 0"
            else:
                a1[i, j] = j // l == i // l  # "floor(j / l) = floor(i / l)"
                a2[i, j] = j % l in range(l - c, l)  # "j mod l in {l - c, ..., l}"
    return a1, a2


def _dense(model, x, allowed, kpm):
    b, t, _ = x.shape
    lin = lambda layer: (x @ layer.weight.T + layer.bias).view(b, t, H, D // H).transpose(1, 2)  # noqa: E731
    q, k, v = lin(model.q_proj), lin(model.k_proj), lin(model.v_proj)
    full = allowed[None, None] & kpm[:, None, None, :]  # (B, 1, T, T)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).masked_fill(~full, -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zero
    heads = (weights @ v).transpose(1, 2).reshape(b, t, D)
    return heads @ model.out_proj.weight.T + model.out_proj.bias, weights


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("pattern,stride,num_summary", [("strided", 1, 1), ("strided", 2, 1), ("strided", 3, 1),
                                                        ("strided", 5, 1), ("fixed", 1, 1), ("fixed", 3, 1),
                                                        ("fixed", 3, 2), ("fixed", 4, 4), ("fixed", 5, 2)])
@pytest.mark.parametrize("t", [7, 12])
def test_equals_dense_attention_with_the_pattern_mask(need_weights, pattern, stride, num_summary, t):
    model = _model(pattern, stride, num_summary)
    x = _x(t=t)
    kpm = torch.ones(2, t, dtype=torch.bool)
    kpm[1, [0, t - 2]] = False  # two padded keys, one of them a likely summary/column token
    a1, a2 = _paper_masks(t, pattern, stride, num_summary)
    expected, expected_w = _dense(model, x, a1 | a2, kpm)
    with torch.no_grad():
        result = model(x, key_padding_mask=kpm, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert (out - expected).abs().max() < TOL
    if need_weights:
        assert (result[1] - expected_w).abs().max() < TOL


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_the_mask_function_is_the_papers_pattern(pattern):
    for t, l, c in ((9, 3, 1), (10, 4, 2), (6, 6, 3)):
        a1, a2 = sparse_transformer_masks(t, pattern, l, c)
        e1, e2 = _paper_masks(t, pattern, l, c)
        assert torch.equal(a1, e1) and torch.equal(a2, e2)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("t,l,c", [(16, 4, 1), (25, 5, 1), (30, 4, 2), (12, 12, 1)])
def test_two_factorised_steps_connect_every_earlier_position(pattern, t, l, c):
    a1, a2 = _paper_masks(t, pattern, l, c)
    union = (a1 | a2).double()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    # Two layers of the union pattern: i -> k -> j. Every j <= i is reached (and nothing in the future).
    two_steps = (union @ union) > 0
    assert torch.equal(two_steps, causal)
    if pattern == "strided":  # Child et al.'s factorisation: first A2 (jump by multiples of l), then A1 (< l back)
        assert torch.equal((a2.double() @ a1.double()) > 0, causal)
    # ... while one step reaches only O(l + T / l) keys per query, not all of them (unless one block covers all).
    per_row = (a1 | a2).sum(dim=-1)
    assert per_row.max() <= (2 * l + t // l if pattern == "strided" else l + c * (t // l + 1))
    if l < t:
        assert not torch.equal(a1 | a2, causal)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_a_stride_covering_the_sequence_is_full_causal_attention(pattern):
    t = 6
    model = _model(pattern, stride=t)
    with torch.no_grad():
        x = _x(t=t)
        expected = mha_reference(model, x, is_causal=True)[0]  # nn.MultiheadAttention, copied weights
        assert (model(x) - expected).abs().max() < TOL
        assert (model(x, is_causal=True) - expected).abs().max() < TOL  # already causal: the flag changes nothing
        # distinct: a shorter stride is not full causal attention with the same weights
        shorter = _model(pattern, stride=2)
        assert (shorter(x) - expected).abs().max() > 1e-3


def test_a_dense_mask_is_refused_and_bad_arguments_too():
    model = _model()
    x = _x(t=5)
    with pytest.raises(ValueError, match="mask is not supported"):
        model(x, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pattern"):
        SparseTransformerAttention(D, H, "dilated")
    with pytest.raises(ValueError, match="num_summary"):
        SparseTransformerAttention(D, H, "fixed", stride=2, num_summary=3)
    with pytest.raises(ValueError, match="stride"):
        SparseTransformerAttention(D, H, "fixed", stride=0)


def test_every_constructor_argument_changes_the_output():
    x = _x(t=12)
    base = _model("fixed", stride=3, num_summary=1)
    out = base(x)
    state = base.state_dict()

    def same_weights(**kwargs):  # a model built with other arguments, holding the base's tensors
        return load_matching_(_model(**kwargs), state)(x)

    assert (same_weights(pattern="strided", stride=3) - out).abs().max() > 1e-3, "pattern"
    assert (same_weights(pattern="fixed", stride=4) - out).abs().max() > 1e-3, "stride"
    assert (same_weights(pattern="fixed", stride=3, num_summary=2) - out).abs().max() > 1e-3, "num_summary"
    assert (same_weights(pattern="fixed", stride=3, num_heads=4) - out).abs().max() > 1e-3, "num_heads"
    assert (same_weights(pattern="fixed", stride=3, bias=False) - out).abs().max() > 1e-3, "bias"
    dropped = _model("fixed", stride=3, dropout=0.5).train()
    dropped.load_state_dict(state)
    assert (dropped(x) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, 12, 4), "d_model"
    # num_summary does not matter for "strided" (documented): no summary tokens there.
    assert torch.equal(_model("strided", 3, num_summary=1)(x), _model("strided", 3, num_summary=2)(x))
