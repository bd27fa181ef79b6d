"""mechanisms/co_attention.py against explicit loops over Lu et al.'s equations.

Oracles: a per-(word, region) loop for parallel co-attention and a step-by-step loop for alternating
co-attention, with padding in both sequences; the W_b = 0 limit (two independent attention poolings); the
symmetry "swapping the inputs (and their parameters) swaps the outputs".
"""
import pytest
import torch

from mechanisms.co_attention import CoAttention
from tests.oracles import random_inputs, randomize_

D, K, T1, T2 = 6, 4, 4, 7
TOL = 1e-10


def _model(mode="parallel", d_model=D, hidden_dim=K, seed=0, **kwargs):
    torch.manual_seed(seed)
    # non-zero biases, larger weights: the tanh leaves its linear range
    return randomize_(CoAttention(d_model, hidden_dim, mode=mode, **kwargs).double(), 0.7)


def _inputs(b=2, seed=1):
    return random_inputs(b, (T1, T2), D, seed=seed)


def _masks():
    m1, m2 = torch.ones(2, T1, dtype=torch.bool), torch.ones(2, T2, dtype=torch.bool)
    m1[1, 3:] = False
    m2[0, 5:] = False
    m2[1, 2] = False
    return m1, m2


def _lin(layer, x):
    return layer.weight @ x + (layer.bias if layer.bias is not None else 0.0)


def _pool(scores, xs):
    w = torch.softmax(torch.stack(scores), 0)
    return sum(w[i] * x for i, x in enumerate(xs)), w


def _parallel_loop(m, q, v):
    """Eq. (1)-(4) for one example, lists of real positions only."""
    c = [[torch.tanh(q[t] @ m.W_b @ v[n]) for n in range(len(v))] for t in range(len(q))]
    wq = [_lin(m.first_proj, q[t]) for t in range(len(q))]
    wv = [_lin(m.second_proj, v[n]) for n in range(len(v))]
    hv = [torch.tanh(wv[n] + sum(c[t][n] * wq[t] for t in range(len(q)))) for n in range(len(v))]
    hq = [torch.tanh(wq[t] + sum(c[t][n] * wv[n] for n in range(len(v)))) for t in range(len(q))]
    v_hat, a_v = _pool([m.second_score.weight[0] @ h for h in hv], v)
    q_hat, a_q = _pool([m.first_score.weight[0] @ h for h in hq], q)
    return q_hat, v_hat, a_q, a_v


def _alternating_loop(m, q, v):
    """Eq. (5)-(6) for one example: s = A(Q; 0), v_hat = A(V; s), q_hat = A(Q; v_hat)."""
    s, _ = _pool([m.summary_score.weight[0] @ torch.tanh(_lin(m.summary_proj, x)) for x in q], q)
    v_hat, a_v = _pool([m.second_score.weight[0] @ torch.tanh(_lin(m.second_proj, x) + m.second_guide.weight @ s)
                        for x in v], v)
    q_hat, a_q = _pool([m.first_score.weight[0] @ torch.tanh(_lin(m.first_proj, x) + m.first_guide.weight @ v_hat)
                        for x in q], q)
    return q_hat, v_hat, a_q, a_v


@pytest.mark.parametrize("mode,loop", [("parallel", _parallel_loop), ("alternating", _alternating_loop)])
@pytest.mark.parametrize("padded", [False, True])
def test_equals_the_explicit_loop(mode, loop, padded):
    model = _model(mode)
    first, second = _inputs()
    m1, m2 = _masks() if padded else (torch.ones(2, T1, dtype=torch.bool), torch.ones(2, T2, dtype=torch.bool))
    with torch.no_grad():
        (q_hat, v_hat), (a_q, a_v) = model(first, second, m1 if padded else None, m2 if padded else None,
                                           need_weights=True)
        for b in range(2):
            eq, ev, eaq, eav = loop(model, first[b][m1[b]], second[b][m2[b]])
            assert (q_hat[b] - eq).abs().max() < TOL and (v_hat[b] - ev).abs().max() < TOL
            assert (a_q[b][m1[b]] - eaq).abs().max() < TOL and (a_v[b][m2[b]] - eav).abs().max() < TOL
            assert (a_q[b][~m1[b]] == 0).all() and (a_v[b][~m2[b]] == 0).all()


def test_without_affinity_parallel_co_attention_is_two_independent_attention_poolings():
    model = _model()
    with torch.no_grad():
        model.W_b.zero_()  # C = 0, eq. (1)
        first, second = _inputs()
        q_hat, v_hat = model(first, second)
        for x, proj, score, out in ((first, model.first_proj, model.first_score, q_hat),
                                    (second, model.second_proj, model.second_score, v_hat)):
            weights = torch.softmax(score(torch.tanh(proj(x))).squeeze(-1), -1)  # u^T tanh(W x + b): pooling
            assert (out - (weights[..., None] * x).sum(1)).abs().max() < TOL
        # ... so the question's summary does not depend on the image at all
        assert (model(first, torch.randn_like(second))[0] - q_hat).abs().max() < TOL


@pytest.mark.parametrize("mode", ["parallel", "alternating"])
def test_distinct_each_summary_depends_on_the_other_sequence(mode):
    # Outside the W_b = 0 limit (or in alternating mode always) the attention over one sequence is guided by
    # the other: a different image changes the question's summary, which no attention pooling does.
    model = _model(mode)
    first, second = _inputs()
    with torch.no_grad():
        q_hat, v_hat = model(first, second)
        q2, _ = model(first, second + torch.randn_like(second))
        _, v2 = model(first + torch.randn_like(first), second)
    assert (q2 - q_hat).abs().max() > 1e-3 and (v2 - v_hat).abs().max() > 1e-3


def test_swapping_the_inputs_swaps_the_roles_in_parallel_mode():
    model = _model()
    swapped = _model(seed=5)
    with torch.no_grad():
        swapped.W_b.copy_(model.W_b.T)  # C' = tanh(V W_b^T Q^T) = C^T
        swapped.first_proj.load_state_dict(model.second_proj.state_dict())
        swapped.second_proj.load_state_dict(model.first_proj.state_dict())
        swapped.first_score.load_state_dict(model.second_score.state_dict())
        swapped.second_score.load_state_dict(model.first_score.state_dict())
        first, second = _inputs()
        m1, m2 = _masks()
        q_hat, v_hat = model(first, second, m1, m2)
        v_swapped, q_swapped = swapped(second, first, m2, m1)
    assert (q_hat - q_swapped).abs().max() < TOL and (v_hat - v_swapped).abs().max() < TOL
    # with the parameters left in place, swapping the inputs gives something else: the roles are learned
    assert (model(second[:, :T1], first)[1] - q_hat).abs().max() > 1e-3


def test_an_all_padded_sequence_gives_a_zero_summary_with_finite_gradients():
    for mode in ("parallel", "alternating"):
        model = _model(mode)
        first, second = (t.requires_grad_() for t in _inputs())
        m2 = torch.ones(2, T2, dtype=torch.bool)
        m2[0] = False
        q_hat, v_hat = model(first, second, second_padding_mask=m2)
        assert (v_hat[0] == 0).all() and torch.isfinite(q_hat).all()
        (q_hat.sum() + v_hat.sum()).backward()
        assert torch.isfinite(first.grad).all() and torch.isfinite(second.grad).all()
        assert (second.grad[0] == 0).all()


def test_every_constructor_argument_changes_the_output():
    first, second = _inputs()
    base = _model()
    with torch.no_grad():
        out = torch.cat(base(first, second), -1)

        def diff(other):
            return (torch.cat(other(first, second), -1) - out).abs().max().item()

        assert diff(_model(mode="alternating")) > 1e-3, "mode"
        no_bias = _model(bias=False)
        no_bias.load_state_dict({n: p for n, p in base.state_dict().items() if not n.endswith("bias")})
        assert diff(no_bias) > 1e-3, "bias"
        wider = _model(hidden_dim=K + 1)  # base's k hidden units plus one more
        state = wider.state_dict()
        for name, p in base.state_dict().items():
            state[name][tuple(slice(0, s) for s in p.shape)] = p
        wider.load_state_dict(state)
        assert diff(wider) > 1e-3, "hidden_dim"
    assert CoAttention(3, 2).double()(first[..., :3], second[..., :3])[0].shape == (2, 3), "d_model"
    with pytest.raises(ValueError, match="mode"):
        CoAttention(D, K, mode="serial")
