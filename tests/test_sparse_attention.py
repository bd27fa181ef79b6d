"""mechanisms/sparse_attention.py: each sparse map against an independent oracle, its backward against the
closed-form Jacobian, top-k with k >= Tk against torch's multi-head attention, distinctness and arguments.

The generic checks (bad input, masked rows, key padding, gradcheck of the module, dropout, state dict,
bf16) are in the conformance suite: tests/conformance/entries/sparse_attention.py.
"""
import math

import pytest
import torch

from mechanisms.sparse_attention import SparseAttention, entmax15, sparsemax, topk_softmax
from tests.oracles import mha_reference, output_of, random_inputs, random_mask, randomize_

FP64_TOL = 1e-10
D, H = 16, 4


def _model(method="sparsemax", top_k=None, d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    # larger than default weights, so that the scores spread and zeros appear
    model = SparseAttention(d_model, num_heads, method=method, top_k=top_k, **kwargs).double()
    return randomize_(model, 1.0).eval()


def _inputs(b=2, tq=4, tk=6, seed=1):
    return random_inputs(b, (tq, tk, tk), D, seed=seed)


def _rows(n=20, width=7, seed=3, scale=2.0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _simplex_projection(row):
    """Euclidean projection onto the simplex, the sort algorithm of Duchi et al. (2008), in plain Python."""
    values = [float(v) for v in row.detach()]
    ordered = sorted(values, reverse=True)
    total, theta = 0.0, None
    for j, u in enumerate(ordered, start=1):
        total += u
        candidate = (total - 1.0) / j
        if u - candidate > 0:
            theta = candidate
    return torch.tensor([max(v - theta, 0.0) for v in values], dtype=torch.float64)


def _entmax15_bisection(row, steps=200):
    """1.5-entmax by bisection on tau: sum_i max(z_i / 2 - tau, 0)^2 = 1, with tau in [max/2 - 1, max/2]."""
    x = [float(v) / 2 for v in row.detach()]
    low, high = max(x) - 1.0, max(x)
    for _ in range(steps):
        mid = (low + high) / 2
        if sum(max(v - mid, 0.0) ** 2 for v in x) > 1.0:
            low = mid
        else:
            high = mid
    return torch.tensor([max(v - low, 0.0) ** 2 for v in x], dtype=torch.float64)


def _oracle(method, top_k):
    def topk_row(row):
        kept = sorted(range(len(row)), key=lambda j: -float(row[j].detach()))[:top_k]
        out = torch.zeros(len(row), dtype=torch.float64)
        out[kept] = torch.softmax(row[kept], dim=0)
        return out
    return {"sparsemax": _simplex_projection, "entmax15": _entmax15_bisection, "topk": topk_row}[method]


def test_sparsemax_is_the_euclidean_projection_onto_the_simplex():
    z = _rows()
    p = sparsemax(z)
    expected = torch.stack([_simplex_projection(row) for row in z])
    assert (p - expected).abs().max() < FP64_TOL
    # ...and no other point of the simplex is closer to z.
    others = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((200,))  # (200, 7)
    assert ((p - z).norm(dim=-1)[:, None] <= (others[None] - z[:, None]).norm(dim=-1) + 1e-12).all()
    assert (p == 0).any(dim=-1).all()  # exact zeros in every row at this scale


def test_sparsemax_backward_is_the_closed_form_jacobian():
    for row in _rows(n=5):
        jacobian = torch.autograd.functional.jacobian(sparsemax, row)
        s = (sparsemax(row) > 0).double()
        expected = torch.diag(s) - torch.outer(s, s) / s.sum()  # Martins & Astudillo, eq. (11)
        assert (jacobian - expected).abs().max() < FP64_TOL
    assert torch.autograd.gradcheck(sparsemax, (_rows(n=3).requires_grad_(),))


def test_in_two_dimensions_sparsemax_is_the_hard_sigmoid_and_entmax15_saturates_at_2():
    t = torch.linspace(-3, 3, 61, dtype=torch.float64)
    z = torch.stack([t, torch.zeros_like(t)], dim=-1)
    assert (sparsemax(z)[:, 0] - ((t + 1) / 2).clamp(0, 1)).abs().max() < FP64_TOL
    # Both in the support while |t/2| < 1: tau solves (t/2 - tau)^2 + tau^2 = 1.
    half = (t / 2).clamp(-1, 1)
    expected = ((half + torch.sqrt(2 - half ** 2)) / 2) ** 2
    assert (entmax15(z)[:, 0] - expected).abs().max() < FP64_TOL
    assert (entmax15(z)[t.abs() >= 2] .min(dim=-1).values == 0).all()  # exact 0 and 1 beyond |t| = 2
    assert (torch.softmax(z, -1) > 0).all()


def test_entmax15_matches_bisection_and_its_closed_form_jacobian():
    z = _rows()
    p = entmax15(z)
    assert (p - torch.stack([_entmax15_bisection(row) for row in z])).abs().max() < FP64_TOL
    assert (p == 0).any() and ((p.sum(-1) - 1).abs() < FP64_TOL).all()
    for row in z[:5]:
        jacobian = torch.autograd.functional.jacobian(entmax15, row)
        g = entmax15(row).sqrt()
        expected = torch.diag(g) - torch.outer(g, g) / g.sum()  # Peters et al., Proposition 1
        assert (jacobian - expected).abs().max() < FP64_TOL
    assert torch.autograd.gradcheck(entmax15, (_rows(n=3).requires_grad_(),))


def test_entmax15_lies_between_softmax_and_sparsemax_in_sparsity():
    z = _rows(n=200, width=16, scale=1.0)
    support = {name: (f(z) > 0).sum(-1).double() for name, f in
               (("softmax", lambda s: torch.softmax(s, -1)), ("entmax15", entmax15), ("sparsemax", sparsemax))}
    assert (support["softmax"] == 16).all()
    assert (support["sparsemax"] <= support["entmax15"]).all()
    assert support["entmax15"].mean() < support["softmax"].mean()
    assert support["sparsemax"].mean() < support["entmax15"].mean()


def test_masked_scores_get_zero_and_the_rest_is_the_map_of_the_unmasked_scores():
    z = _rows(n=6, width=7, scale=1.0)
    hidden = torch.tensor([False, True, False, False, True, False, False])
    for f in (sparsemax, entmax15, lambda s: topk_softmax(s, 3)):
        p = f(z.masked_fill(hidden, float("-inf")))
        assert (p[:, hidden] == 0).all()
        assert (p[:, ~hidden] - f(z[:, ~hidden])).abs().max() < FP64_TOL


def test_topk_keeps_exactly_k_keys_and_softmaxes_them():
    z = _rows()
    for k in (1, 3, 7, 10):
        p = topk_softmax(z, k)
        assert ((p > 0).sum(-1) == min(k, 7)).all()
        assert (p - torch.stack([_oracle("topk", k)(row) for row in z])).abs().max() < FP64_TOL
    assert (topk_softmax(z, 7) - torch.softmax(z, -1)).abs().max() < FP64_TOL


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("top_k", [6, 9])
def test_topk_with_k_at_least_the_number_of_keys_is_torch_multihead_attention(top_k, need_weights):
    model = _model("topk", top_k=top_k)
    q, k, v = _inputs()
    mask = random_mask((2, H, 4, 6))
    expected, expected_w = mha_reference(model, q, k, v, mask=mask)  # nn.MultiheadAttention, copied weights
    ours = model(q, k, v, mask=mask, need_weights=need_weights)
    assert (output_of(ours) - expected).abs().max() < FP64_TOL
    if need_weights:
        assert (ours[1] - expected_w).abs().max() < FP64_TOL


@pytest.mark.parametrize("method,top_k", [("sparsemax", None), ("entmax15", None), ("topk", 2)])
def test_module_matches_the_formula_written_out(method, top_k):
    model = _model(method, top_k=top_k)
    q, k, v = _inputs(tq=3, tk=5)
    padding = torch.tensor([[True, True, True, True, False], [True, False, True, True, True]])
    out, weights = model(q, k, v, key_padding_mask=padding, is_causal=True, need_weights=True)
    dh, pi = D // H, _oracle(method, top_k)
    qp, kp, vp = model.q_proj(q), model.k_proj(k), model.v_proj(v)
    concat = torch.zeros(2, 3, D, dtype=torch.float64)
    for n in range(2):
        for h in range(H):
            cols = slice(h * dh, (h + 1) * dh)
            for i in range(3):
                visible = [j for j in range(5) if j <= i + 2 and padding[n, j]]
                scores = torch.stack([qp[n, i, cols] @ kp[n, j, cols] / math.sqrt(dh) for j in visible])
                w = torch.zeros(5, dtype=torch.float64)
                w[visible] = pi(scores)
                assert (weights[n, h, i] - w).abs().max() < FP64_TOL
                concat[n, i, cols] = w @ vp[n, :, cols]
    assert (out - model.out_proj(concat)).abs().max() < FP64_TOL
    assert (model(q, k, v, key_padding_mask=padding, is_causal=True) - out).abs().max() < FP64_TOL


def test_distinct_from_multi_head_attention_and_weights_have_exact_zeros():
    q, k, v = _inputs()
    softmax_model = _model("topk", top_k=6)  # = multi-head attention (test above)
    reference = softmax_model(q, k, v)
    for method, top_k in (("sparsemax", None), ("entmax15", None), ("topk", 2)):
        model = _model(method, top_k=top_k)  # same seed: the same weights
        out, weights = model(q, k, v, need_weights=True)
        assert (out - reference).abs().max() > 1e-3, method
        assert (weights == 0).any(), method
        assert ((weights.sum(-1) - 1).abs() < FP64_TOL).all(), method


def test_every_constructor_argument_changes_the_output():
    q, k, v = _inputs()
    base = _model("sparsemax")
    out = base(q, k, v)
    assert (_model("entmax15")(q, k, v) - out).abs().max() > 1e-3, "method"
    assert (_model("topk", top_k=2)(q, k, v) - _model("topk", top_k=3)(q, k, v)).abs().max() > 1e-3, "top_k"
    two = _model(num_heads=2)
    two.load_state_dict(base.state_dict())
    assert (two(q, k, v) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if n.endswith("weight")})
    assert (no_bias(q, k, v) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    torch.manual_seed(0)
    assert (dropped(q, k, v) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2)(q[..., :8]).shape == (2, 4, 8), "d_model"
    with pytest.raises(ValueError, match="top_k"):
        SparseAttention(D, H, method="topk")
    with pytest.raises(ValueError, match="top_k"):
        SparseAttention(D, H, method="sparsemax", top_k=3)
    with pytest.raises(ValueError, match="method"):
        SparseAttention(D, H, method="softmax")
