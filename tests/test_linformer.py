"""mechanisms/linformer.py against multi-head attention in its limit, an explicit loop over the paper's formula,
and the documented handling of padding.

The generic checks are the conformance suite's (tests/conformance/entries/linformer.py); its `weights` check is
exempt there (the weights are over the k projected rows, not the Tk keys), so their shape, normalisation and
"before dropout" are checked here.
"""
import math

import pytest
import torch

from mechanisms.linformer import LinformerAttention
from tests.oracles import random_inputs, randomize_, torch_mha_like

TOL = 1e-10
D, H = 8, 2


def _model(max_seq_len=8, proj_dim=3, share_kv=False, d_model=D, num_heads=H, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = LinformerAttention(d_model, num_heads, max_seq_len, proj_dim, share_kv, **kwargs).double()
    return randomize_(model, biases_only=True).eval()


def _x(b=2, t=6, seed=1):
    return random_inputs(b, t, D, seed=seed)


def _reference(model, xq, xk, real):
    """Eq. (1)-(4) with explicit sums over positions: Kbar_r = sum_j E[r, j] real_j K_j, per head and query."""
    b, tq, _ = xq.shape
    tk = xk.size(1)
    dh = D // H
    q = (xq @ model.q_proj.weight.T + model.q_proj.bias).view(b, tq, H, dh)
    k = (xk @ model.k_proj.weight.T + model.k_proj.bias).view(b, tk, H, dh)
    v = (xk @ model.v_proj.weight.T + model.v_proj.bias).view(b, tk, H, dh)
    e = model.e_proj.detach()
    f = e if model.f_proj is None else model.f_proj.detach()
    heads = torch.zeros(b, tq, H, dh, dtype=xq.dtype)
    for n in range(b):
        k_bar = [sum(e[r, j] * k[n, j] * real[n, j] for j in range(tk)) for r in range(model.proj_dim)]  # (H, Dh)
        v_bar = [sum(f[r, j] * v[n, j] * real[n, j] for j in range(tk)) for r in range(model.proj_dim)]
        for h in range(H):
            for i in range(tq):
                scores = torch.stack([q[n, i, h] @ k_bar[r][h] for r in range(model.proj_dim)]) / math.sqrt(dh)
                w = torch.softmax(scores, dim=0)
                heads[n, i, h] = sum(w[r] * v_bar[r][h] for r in range(model.proj_dim))
    return heads.reshape(b, tq, D) @ model.out_proj.weight.T + model.out_proj.bias


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("permute", [False, True])
def test_identity_or_permutation_projections_with_k_equal_n_are_multi_head_attention(need_weights, permute):
    t = 6
    model = _model(max_seq_len=t, proj_dim=t)
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(5)) if permute else torch.arange(t)
    p = torch.eye(t, dtype=torch.float64)[perm]  # (k, n): projected row r is key perm[r]
    with torch.no_grad():
        model.e_proj.copy_(p)
        model.f_proj.copy_(p)
    xq, xk = _x(t=4), _x(t=t, seed=2)
    expected, expected_w = torch_mha_like(model)(xq, xk, xk, average_attn_weights=False)
    with torch.no_grad():
        result = model(xq, xk, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert (out - expected).abs().max() < TOL
    if need_weights:  # the weight of projected row r is the weight of key perm[r]
        assert (result[1] - expected_w[..., perm]).abs().max() < TOL


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("tq,tk", [(5, 5), (3, 7)])
def test_matches_the_explicit_formula(share_kv, tq, tk):
    model = _model(max_seq_len=8, proj_dim=3, share_kv=share_kv)  # T < n: the first T columns of E and F
    xq, xk = _x(t=tq), _x(t=tk, seed=2)
    expected = _reference(model, xq, xk, torch.ones(2, tk))
    with torch.no_grad():
        assert (model(xq, xk) - expected).abs().max() < TOL
        assert (model(xq, xk, need_weights=True)[0] - expected).abs().max() < TOL


def test_padding_zeroes_the_padded_rows_before_the_projection():
    model = _model(max_seq_len=8, proj_dim=3)
    x = _x(t=7)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[0, 5:] = False  # padding at the end
    kpm[1, 2] = False  # a hole in the middle
    with torch.no_grad():
        out = model(x, key_padding_mask=kpm)
        # eq. (3): the padded keys and values count as zero rows, i.e. their columns of E and F are dropped.
        assert (out - _reference(model, x, x, kpm.double())).abs().max() < TOL
        # Padding at the end therefore gives exactly the unpadded sequence (same positions, same columns).
        short = model(x[:1], x[:1, :5])
        assert (out[0] - short[0]).abs().max() < TOL


def test_distinct_from_multi_head_attention():
    t = 6
    model = _model(max_seq_len=t, proj_dim=t)  # k = n, but a random E and F, not a permutation
    x = _x(t=t)
    with torch.no_grad():
        assert (model(x) - torch_mha_like(model)(x, x, x)[0]).abs().max() > 1e-3


def test_weights_are_over_the_k_projected_rows_and_taken_before_dropout():
    model = _model(proj_dim=3, dropout=0.5)
    x = _x(t=6)
    out_eval, w_eval = model(x, need_weights=True)
    assert w_eval.shape == (2, H, 6, 3)
    assert (w_eval.sum(-1) - 1).abs().max() < TOL
    model.train()
    torch.manual_seed(0)
    out_train, w_train = model(x, need_weights=True)
    assert (w_train - w_eval).abs().max() < TOL  # before dropout ...
    assert (out_train - out_eval).abs().max() > 1e-3  # ... while the output was dropped


def test_mask_causal_and_too_long_keys_are_refused():
    model = _model(max_seq_len=8)
    x = _x(t=6)
    with pytest.raises(ValueError, match="mask is not supported"):
        model(x, mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        model(x, is_causal=True)
    with pytest.raises(ValueError, match="key has length 9 but max_seq_len is 8"):
        model(x, _x(t=9))


def test_every_constructor_argument_changes_the_output():
    x = _x(t=6)
    base = _model()
    out = base(x)
    state = base.state_dict()
    smaller = _model(proj_dim=2)
    smaller.load_state_dict(dict(state, e_proj=state["e_proj"][:2], f_proj=state["f_proj"][:2]))
    assert (smaller(x) - out).abs().max() > 1e-3, "proj_dim"
    shared = _model(share_kv=True)
    shared.load_state_dict({k: v for k, v in state.items() if k != "f_proj"})
    assert (shared(x) - out).abs().max() > 1e-3, "share_kv"
    four = _model(num_heads=4)
    four.load_state_dict(state)
    assert (four(x) - out).abs().max() > 1e-3, "num_heads"
    no_bias = _model(bias=False)
    no_bias.load_state_dict({k: v for k, v in state.items() if not k.endswith("bias")})
    assert (no_bias(x) - out).abs().max() > 1e-3, "bias"
    dropped = _model(dropout=0.5).train()
    dropped.load_state_dict(state)
    assert (dropped(x) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=4, num_heads=2)(x[..., :4]).shape == (2, 6, 4), "d_model"
    # max_seq_len: a sequence uses only the first T columns, so with those equal the output is the same; what
    # max_seq_len changes is which lengths are accepted (the refusal is tested above).
    longer = _model(max_seq_len=10)
    longer.load_state_dict(dict(state, e_proj=torch.cat([state["e_proj"], torch.zeros(3, 2, dtype=torch.float64)], 1),
                                f_proj=torch.cat([state["f_proj"], torch.zeros(3, 2, dtype=torch.float64)], 1)))
    assert (longer(x) - out).abs().max() < TOL
