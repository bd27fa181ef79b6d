"""mechanisms/multi_head_latent_attention.py against an explicit per-head formula, PyTorch's multi-head attention
in the limit case, and itself across its three ways of computing the same thing (naive, absorbed, cached).

Oracles: (1) rope_dim = 0, kv_latent_dim = d_model, W^DKV = I: torch.nn.MultiheadAttention with W^K = W^UK,
W^V = W^UV; (2) an explicit loop over heads and queries of the paper's equations, the rotary part written as a
2x2 rotation per feature pair. The generic checks (masks, padding, dropout, gradcheck, dtypes) are the
conformance suite's (tests/conformance/entries/multi_head_latent_attention.py).
"""
import math
import pathlib

import pytest
import torch
import torch.nn as nn

from mechanisms.multi_head_latent_attention import (MultiHeadLatentAttention, cache_elements_per_token,
                                                    cache_table)
from tests.oracles import random_inputs, random_mask

TOL = 1e-10
D, H, DC, DR = 16, 4, 6, 4
PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "mechanisms" / "multi_head_latent_attention.md"


def _model(d_model=D, num_heads=H, kv_latent_dim=DC, rope_dim=DR, q_latent_dim=5, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = MultiHeadLatentAttention(d_model, num_heads, kv_latent_dim, q_latent_dim=q_latent_dim,
                                     rope_dim=rope_dim, **kwargs).double()
    with torch.no_grad():  # non-zero biases, so that a dropped bias would be noticed
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def _x(b=2, t=5, seed=1, d=D):
    return random_inputs(b, t, d, seed=seed)


def _lin(layer, x):
    """x W^T + b written out, so the oracle does not run the module's layers."""
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def _rotate_pairs(v, position, base):
    """The rotary map of eq. (5) on one vector, one 2x2 rotation per pair (v_i, v_{i + d/2})."""
    d = v.numel()
    out = v.clone()
    for i in range(d // 2):
        angle = position * base ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = c * v[i] - s * v[i + d // 2]
        out[i + d // 2] = s * v[i] + c * v[i + d // 2]
    return out


def _reference(model, xq, xk, allowed):
    """Eq. (1)-(7) per batch element, head and query; returns (out (B, Tq, d), weights (B, H, Tq, Tk))."""
    b, tq, _ = xq.shape
    tk = xk.size(1)
    dh, dr = model.head_dim, model.rope_dim
    c_kv = _lin(model.kv_down, xk)  # (B, Tk, d_c)
    c_q = xq if model.q_down is None else _lin(model.q_down, xq)
    q_c = _lin(model.q_up, c_q).view(b, tq, H, dh)
    k_c = _lin(model.k_up, c_kv).view(b, tk, H, dh)
    v = _lin(model.v_up, c_kv).view(b, tk, H, dh)
    if dr:  # eq. (4): query part per head at position i + Tk - Tq, one key part per token at position j
        q_r = _lin(model.q_rope, c_q).view(b, tq, H, dr)
        q_r = [[[_rotate_pairs(q_r[n, i, h], i + tk - tq, model.rope_base) for h in range(H)] for i in range(tq)]
               for n in range(b)]
        k_r = _lin(model.k_rope, xk)
        k_r = [[_rotate_pairs(k_r[n, j], j, model.rope_base) for j in range(tk)] for n in range(b)]
    heads = torch.zeros(b, tq, H, dh, dtype=xq.dtype)
    weights = torch.zeros(b, H, tq, tk, dtype=xq.dtype)
    for n in range(b):
        for h in range(H):
            for i in range(tq):
                scores = []
                for j in range(tk):
                    s = q_c[n, i, h] @ k_c[n, j, h] + (q_r[n][i][h] @ k_r[n][j] if dr else 0.0)
                    scores.append(s / math.sqrt(dh + dr) if allowed[i, j] else torch.tensor(-math.inf))
                w = torch.softmax(torch.stack(scores), dim=0)
                weights[n, h, i] = w
                heads[n, i, h] = w @ v[n, :, h]
    return _lin(model.out_proj, heads.reshape(b, tq, H * dh)), weights


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("q_latent_dim", [None, 5])
@pytest.mark.parametrize("tq,tk,causal", [(5, 5, True), (3, 5, True), (4, 6, False)])
def test_matches_the_explicit_formula_with_decoupled_rope(need_weights, q_latent_dim, tq, tk, causal):
    model = _model(q_latent_dim=q_latent_dim, rope_base=100.0)
    xq, xk = _x(t=tq), _x(t=tk, seed=2)
    allowed = torch.tensor([[(j <= i + tk - tq) or not causal for j in range(tk)] for i in range(tq)])
    expected, expected_w = _reference(model, xq, xk, allowed)
    with torch.no_grad():
        result = model(xq, xk, is_causal=causal, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert (out - expected).abs().max() < TOL
    if need_weights:
        assert (result[1] - expected_w).abs().max() < TOL


@pytest.mark.parametrize("need_weights", [False, True])
def test_without_compression_or_rope_it_is_torch_multihead_attention(need_weights):
    # rope_dim = 0, kv_latent_dim = d_model and W^DKV = I: K^C = X W^UK, V = X W^UV, scale 1/sqrt(Dh).
    model = _model(kv_latent_dim=D, rope_dim=0, q_latent_dim=None)
    with torch.no_grad():
        model.kv_down.weight.copy_(torch.eye(D, dtype=torch.float64))
        model.kv_down.bias.zero_()
    ref = nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([model.q_up.weight, model.k_up.weight, model.v_up.weight]))
        ref.in_proj_bias.copy_(torch.cat([model.q_up.bias, torch.zeros(2 * D, dtype=torch.float64)]))
        ref.out_proj.weight.copy_(model.out_proj.weight)
        ref.out_proj.bias.copy_(model.out_proj.bias)
    xq, xk = _x(t=4), _x(t=6, seed=2)
    mask = random_mask((2, H, 4, 6), seed=3)
    expected, expected_w = ref(xq, xk, xk, attn_mask=~mask.reshape(2 * H, 4, 6), average_attn_weights=False)
    with torch.no_grad():
        result = model(xq, xk, mask=mask, need_weights=need_weights)
    assert ((result[0] if need_weights else result) - expected).abs().max() < TOL
    if need_weights:
        assert (result[1] - expected_w).abs().max() < TOL


@pytest.mark.parametrize("rope_dim", [0, DR])
@pytest.mark.parametrize("prefill", [0, 3])
def test_absorbed_path_equals_naive_path(rope_dim, prefill):
    model = _model(rope_dim=rope_dim)
    x = _x(t=6)
    with torch.no_grad():
        cache = model.step(x[:, :prefill], absorbed=False)[1] if prefill else None
        naive, cache_n = model.step(x[:, prefill:], cache, absorbed=False)
        absorbed, cache_a = model.step(x[:, prefill:], cache, absorbed=True)
    assert torch.equal(cache_n, cache_a)
    assert (absorbed - naive).abs().max() < TOL


@pytest.mark.parametrize("absorbed", [True, False])
@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1, 1, 1), (3, 1, 2, 1), (7,)])
def test_cached_decoding_equals_full_recompute(absorbed, chunks):
    model = _model()
    x = _x(t=7)
    with torch.no_grad():
        full = model(x, is_causal=True)
        cache, outs, start = None, [], 0
        for n in chunks:
            out, cache = model.step(x[:, start:start + n], cache, absorbed=absorbed)
            outs.append(out)
            start += n
    assert (torch.cat(outs, dim=1) - full).abs().max() < TOL


def test_the_cache_holds_only_the_latent_and_the_rotary_key():
    model = _model()
    x = _x(t=5)
    with torch.no_grad():
        _, cache = model.step(x)
    assert cache.shape == (2, 5, DC + DR)  # not (2, 5, 2 * H * Dh)
    assert torch.allclose(cache[..., :DC], _lin(model.kv_down, x), atol=TOL)  # c_KV itself, eq. (1)
    k_r = _lin(model.k_rope, x)
    rotated = torch.stack([torch.stack([_rotate_pairs(k_r[n, t], t, model.rope_base) for t in range(5)])
                           for n in range(2)])
    assert torch.allclose(cache[..., DC:], rotated, atol=TOL)  # k^R, rotated at its position, eq. (4)
    half = model.half().step(x.half())[1]
    assert half.numel() * half.element_size() == 2 * 5 * model.cache_bytes_per_token(bytes_per_element=2)


def test_cache_table_follows_the_formula_and_the_page_shows_it():
    page = PAGE.read_text(encoding="utf-8")
    layers, heads, dh, dc, dr = 60, 128, 128, 512, 64  # DeepSeek-V2, paper section 3.1.2
    expected = {"MHA": 2 * heads * dh, "GQA": 2 * 8 * dh, "MQA": 2 * dh, "MLA": dc + dr}
    for row in cache_table(num_kv_heads=8, bytes_per_element=2):
        assert row["elements"] == expected[row["kind"]]
        assert row["bytes_per_token"] == expected[row["kind"]] * layers * 2
        assert row["ratio"] == expected[row["kind"]] / expected["MHA"]
        line = next((ln for ln in page.splitlines() if ln.startswith(f"| {row['kind']} |")), None)
        assert line is not None, f"page table has no row for {row['kind']}"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2:5] == [str(row["elements"]), f"{row['bytes_per_token'] / 1024:.1f}",
                              f"{row['ratio']:.4f}"], cells
    assert cache_elements_per_token("MLA", kv_latent_dim=dc, rope_dim=dr) == 9 * dh // 2  # the paper's 4.5 d_h
    with pytest.raises(ValueError, match="kind"):
        cache_elements_per_token("MLQ")


def test_distinct_from_multi_head_attention():
    # Without rope, MLA IS multi-head attention with the low-rank products W^K = W^DKV W^UK, W^V = W^DKV W^UV
    # (an identity of linear maps, checked here), whose rank is at most d_c < d_model: a full-rank MHA key map
    # is out of reach. With the decoupled rotary key added, the same MHA no longer matches.
    xq = _x(t=5)
    for rope_dim, equal in ((0, True), (DR, False)):
        model = _model(rope_dim=rope_dim, q_latent_dim=None)
        mha = nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64).eval()
        with torch.no_grad():
            w_k = model.k_up.weight @ model.kv_down.weight  # (H*Dh, d)
            w_v = model.v_up.weight @ model.kv_down.weight
            mha.in_proj_weight.copy_(torch.cat([model.q_up.weight, w_k, w_v]))
            mha.in_proj_bias.copy_(torch.cat([model.q_up.bias, model.k_up.weight @ model.kv_down.bias,
                                              model.v_up.weight @ model.kv_down.bias]))
            mha.out_proj.load_state_dict(model.out_proj.state_dict())
            diff = (model(xq, need_weights=True)[0] - mha(xq, xq, xq)[0]).abs().max()
        assert (diff < TOL) == equal, (rope_dim, diff)
        assert torch.linalg.matrix_rank(w_k) <= DC < D


def test_value_must_be_the_key_and_a_bad_cache_is_refused():
    model = _model()
    x = _x()
    assert torch.equal(model(x, x, x), model(x))
    with pytest.raises(ValueError, match="value"):
        model(x, x, x.clone())
    with pytest.raises(ValueError, match=r"cache.*\(2, Tp, 10\)"):
        model.step(x, torch.zeros(2, 3, 5, dtype=torch.float64))


def test_every_constructor_argument_changes_the_output():
    base = _model()
    x = _x()
    out = base(x)

    def load(model, state):
        model.load_state_dict(state)
        return model(x)

    state = base.state_dict()
    # num_heads: same weight shapes with rope_dim = 0 (H * Dh = d_model either way), different split into heads.
    no_rope = _model(rope_dim=0)
    two_heads = _model(num_heads=2, rope_dim=0)
    assert (load(two_heads, no_rope.state_dict()) - no_rope(x)).abs().max() > 1e-3, "num_heads"
    # rope_dim: the same content weights plus a rotary part (and the scale 1/sqrt(Dh + d_R)).
    assert (load(_model(rope_dim=0), {k: v for k, v in state.items() if "rope" not in k}) - out).abs().max() > 1e-3
    # rope_base: same weights, other frequencies.
    assert (load(_model(rope_base=50.0), state) - out).abs().max() > 1e-3, "rope_base"
    # kv_latent_dim: one latent dimension fewer (the first DC - 1 of base's).
    small = {k: v for k, v in state.items()}
    small["kv_down.weight"], small["kv_down.bias"] = state["kv_down.weight"][:DC - 1], state["kv_down.bias"][:DC - 1]
    small["k_up.weight"], small["v_up.weight"] = state["k_up.weight"][:, :DC - 1], state["v_up.weight"][:, :DC - 1]
    assert (load(_model(kv_latent_dim=DC - 1), small) - out).abs().max() > 1e-3, "kv_latent_dim"
    # q_latent_dim: with W^DQ = I (width d_model, no bias) the query latent is the input itself, so it equals
    # q_latent_dim=None with the same W^UQ, W^QR; a real compression (width 5) changes the output.
    direct = _model(q_latent_dim=None)
    through = _model(q_latent_dim=D)
    wide = {k: v for k, v in direct.state_dict().items()}
    wide["q_down.weight"], wide["q_down.bias"] = torch.eye(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    assert (load(through, wide) - direct(x)).abs().max() < TOL
    narrow = _model(q_latent_dim=5)
    narrow_state = dict(wide, **{"q_down.weight": wide["q_down.weight"][:5], "q_down.bias": wide["q_down.bias"][:5],
                                 "q_up.weight": wide["q_up.weight"][:, :5], "q_rope.weight": wide["q_rope.weight"][:, :5]})
    assert (load(narrow, narrow_state) - direct(x)).abs().max() > 1e-3, "q_latent_dim"
    no_bias = _model(bias=False)
    assert (load(no_bias, {k: v for k, v in state.items() if k in no_bias.state_dict()}) - out).abs().max() > 1e-3
    dropped = _model(dropout=0.5).train()
    torch.manual_seed(0)
    assert (load(dropped, state) - out).abs().max() > 1e-3, "dropout"
    assert _model(d_model=8, num_heads=2)(x[..., :8]).shape == (2, 5, 8), "d_model"
