"""mechanisms/dual_attention.py against the published package, an explicit loop, and its limit cases.

Oracles:
  (1) the package dual-attention 0.0.7 (requirements-test.txt): every class is built there with random
      weights, its state_dict is loaded into ours with strict=True, and the outputs must agree to 1e-5 in
      float32 (eval mode, dropout 0). Where we fixed one of the package's bugs, the test shows the package's
      wrong result next to ours.
  (2) an explicit float64 loop over (i, j, head, relation) of the paper's relational attention formula.
  (3) limit cases: n_heads_ra = 0 is nn.MultiheadAttention with the same weights; W_r = 0 is attention over
      the symbols; and the cached generation of the language model gives the uncached tokens.
The generic checks (masks, gradients, dropout, dtypes, state dict) are in tests/conformance.
"""
import math

import pytest
import torch
import torch.nn as nn

from mechanisms.dual_attention import (Attention, DisentangledRelationalCrossAttention, DualAttention,
                                       DualAttnDecoderBlock, DualAttnEncoderBlock, DualAttnTransformerLM,
                                       PositionalSymbolRetriever, PositionRelativeSymbolRetriever,
                                       RelationalAttention, RelationalCrossAttention, Seq2SeqDualAttnTransformer,
                                       SymbolicAttention, VisionDualAttnTransformer)
from tests.oracles import random_mask, randomize_

FP32_TOL = 1e-5
FP64_TOL = 1e-10
D, B, T = 16, 2, 5
REASON = "needs dual-attention and einops from requirements-test.txt"


def _pkg(module):
    """The package's module `dual_attention.<module>`, or skip the test saying what to install."""
    pytest.importorskip("einops", reason=REASON)
    return pytest.importorskip(f"dual_attention.{module}", reason=REASON)


def _randomize(module, scale=0.5, seed=0):
    """Random values in every parameter (biases and norms included), so that a dropped term shows."""
    return randomize_(module, scale, seed=seed)


def _twins(pkg_cls, our_cls, *args, scale=0.5, **kwargs):
    """(package module, ours) with the package's random weights loaded into ours, strictly; both in eval."""
    theirs = _randomize(pkg_cls(*args, **kwargs), scale).eval()
    ours = our_cls(*args, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _close(a, b, tol=FP32_TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), err


def _inputs(seed=1, b=B, t=T, d=D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, d, generator=g).to(dtype), torch.randn(b, t, d, generator=g).to(dtype)


def _random_mask(t=T, seed=2):
    return random_mask((t, t), seed)  # every query keeps a key: the package gives NaN otherwise


def _rope(dim, t=T):
    return _pkg("attention_utils").precompute_freqs_cis(dim, t)


# ---------------------------------------------------------------------------------------------------------
# Relational attention
# ---------------------------------------------------------------------------------------------------------

RA_CASES = [
    dict(n_heads=4),
    dict(n_heads=4, symmetric_rels=True),
    dict(n_heads=4, n_relations=2, n_kv_heads=2, add_bias_kv=True, add_bias_out=True),
    dict(n_heads=4, n_kv_heads=1, rel_activation="relu"),
    dict(n_heads=2, n_relations=8, rel_activation="sigmoid"),
    dict(n_heads=4, rel_activation="tanh", symmetric_rels=True),
    dict(n_heads=4, rel_activation="gelu"),
    dict(n_heads=4, rel_activation="silu"),
    dict(n_heads=4, rel_activation="softmax"),
    dict(n_heads=2, total_n_heads=4),
    dict(n_heads=4, use_relative_positional_symbols=True),
    dict(n_heads=4, n_kv_heads=2, use_relative_positional_symbols=True, symmetric_rels=True),
]


@pytest.mark.parametrize("mask", ["none", "causal", "attn_mask"])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("case", RA_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_relational_attention_equals_the_package(case, rope, mask):
    theirs, ours = _twins(_pkg("relational_attention").RelationalAttention, RelationalAttention, D, **case)
    x, s = _inputs()
    symbols = torch.randn(T, T, D) if case.get("use_relative_positional_symbols") else s
    options = {"causal": dict(is_causal=True), "attn_mask": dict(attn_mask=_random_mask()), "none": {}}[mask]
    if rope:
        options["freqs_cos"], options["freqs_sin"] = _rope(ours.key_dim)
    expected = theirs(x, symbols, **options)
    got = ours(x, symbols, **options)
    for e, g in zip(expected, got):  # output, attention weights, relations
        _close(g, e)


def _loop_relational_attention(ra, x, symbols, allowed):
    """The paper's formula, one term at a time, in float64: sum_j alpha_ij^h (W_r^h r_ij + W_s^h s_j), then W_o."""
    b, t, _ = x.shape
    hd, dk, dr, rels = ra.head_dim, ra.key_dim, ra.rel_proj_dim, ra.n_relations
    group = ra.n_heads // ra.n_kv_heads
    wq, wk = ra.wq_attn.weight, ra.wk_attn.weight
    wqr, wkr, wv, wr = ra.wq_rel.weight, ra.wk_rel.weight, ra.wv.weight, ra.wr
    relative = ra.use_relative_positional_symbols
    out = torch.zeros(b, t, ra.n_heads * hd, dtype=x.dtype)
    relations = torch.zeros(b, t, t, rels, dtype=x.dtype)
    for n in range(b):
        for i in range(t):
            for h in range(ra.n_heads):
                g = h // group  # the key/value head query head h shares
                q = wq[h * dk:(h + 1) * dk] @ x[n, i]
                score = [float("-inf")] * t
                for j in range(t):
                    if allowed[i, j]:
                        k = wk[g * dk:(g + 1) * dk] @ x[n, j]
                        score[j] = (q @ k).item() / math.sqrt(dk)
                alpha = torch.softmax(torch.tensor(score, dtype=x.dtype), dim=0)
                for j in range(t):
                    r = torch.zeros(rels, dtype=x.dtype)
                    for ell in range(rels):
                        qr = wqr[ell * dr:(ell + 1) * dr] @ x[n, i]
                        kr = wkr[ell * dr:(ell + 1) * dr] @ x[n, j]
                        r[ell] = torch.tanh((qr @ kr) / math.sqrt(dr))
                    relations[n, i, j] = r
                    s_j = symbols[i, j] if relative else symbols[n, j]  # s_(j-i) sits at [i, j]
                    message = wr[h] @ r + wv[g * hd:(g + 1) * hd] @ s_j
                    out[n, i, h * hd:(h + 1) * hd] += alpha[j] * message
    return out @ ra.wo.weight.T, relations


@pytest.mark.parametrize("relative", [False, True])
def test_relational_attention_equals_an_explicit_loop_over_i_j_head_relation(relative):
    torch.manual_seed(0)
    ra = RelationalAttention(8, n_heads=4, n_relations=3, rel_proj_dim=5, n_kv_heads=2, key_dim=3,
                             rel_activation="tanh", use_relative_positional_symbols=relative).double().eval()
    _randomize(ra)
    t = 4
    x, s = _inputs(b=2, t=t, d=8, dtype=torch.float64)
    symbols = torch.randn(t, t, 8, dtype=torch.float64) if relative else s
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    got, _, got_relations = ra(x, symbols, is_causal=True)
    expected, relations = _loop_relational_attention(ra, x, symbols, allowed)
    _close(got, expected, FP64_TOL)
    _close(got_relations, relations, FP64_TOL)  # (B, Tq, Tk, R): r_ij at [b, i, j]


def test_symmetric_relations_are_symmetric_and_not_otherwise():
    x, s = _inputs()
    for symmetric in (True, False):
        ra = _randomize(RelationalAttention(D, 4, symmetric_rels=symmetric)).eval()
        rel = ra(x, s)[2]  # (B, T, T, R)
        asym = (rel - rel.transpose(1, 2)).abs().max().item()
        assert (asym < 1e-6) == symmetric, (symmetric, asym)


def test_with_w_r_zero_relational_attention_is_attention_over_the_symbols():
    torch.manual_seed(0)
    ra = _randomize(RelationalAttention(D, 4, n_kv_heads=2, add_bias_out=True)).double().eval()
    x, s = _inputs(dtype=torch.float64)
    with torch.no_grad():
        ra.wr.zero_()
        got = ra(x, s, is_causal=True)[0]
        # Oracle: standard causal multi-head attention with queries/keys from x and values W_s s_j.
        q = ra.wq_attn(x).view(B, T, 4, -1).transpose(1, 2)
        k = ra.wk_attn(x).view(B, T, 2, -1).transpose(1, 2).repeat_interleave(2, dim=1)
        v = ra.wv(s).view(B, T, 2, -1).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(ra.key_dim)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        heads = torch.softmax(scores, dim=-1) @ v
        expected = ra.wo(heads.transpose(1, 2).reshape(B, T, D))
    _close(got, expected, FP64_TOL)
    with torch.no_grad():  # distinct: with relations switched back on, the symbols alone do not explain it
        ra.wr.normal_()
        assert (ra(x, s, is_causal=True)[0] - expected).abs().max() > 1e-2


def test_every_argument_of_relational_attention_changes_the_output():
    x, s = _inputs()
    rel_symbols = torch.randn(T, T, D)
    base_kwargs = dict(n_heads=4)

    def run(**kw):
        torch.manual_seed(0)
        ra = RelationalAttention(D, **{**base_kwargs, **kw}).eval()
        with torch.no_grad():
            for name, p in ra.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
        symbols = rel_symbols if kw.get("use_relative_positional_symbols") else s
        return ra(x, symbols)[0]

    base = run()
    for kw in (dict(n_relations=2), dict(key_dim=8), dict(n_kv_heads=2), dict(rel_activation="relu"),
               dict(rel_proj_dim=2), dict(add_bias_kv=True), dict(add_bias_out=True), dict(symmetric_rels=True),
               dict(use_relative_positional_symbols=True), dict(total_n_heads=8)):
        other = run(**kw)
        assert other.shape != base.shape or (other - base).abs().max() > 1e-4, kw


# ---------------------------------------------------------------------------------------------------------
# Fixed bugs of the package's attention modules, each shown next to ours
# ---------------------------------------------------------------------------------------------------------

def test_attention_scale_follows_key_dim():
    """The package scales by 1/sqrt(head_dim) even when key_dim differs; ours by 1/sqrt(key_dim)."""
    theirs, ours = _twins(_pkg("relational_attention").RelationalAttention, RelationalAttention, D, 4, key_dim=8)
    x, s = _inputs()
    assert ours.attn_scale == 1 / math.sqrt(8) and theirs.attn_scale == 1 / math.sqrt(4)
    assert (theirs(x, s)[0] - ours(x, s)[0]).abs().max() > 1e-3  # the package's output is off
    theirs.attn_scale = 1 / math.sqrt(8)  # mend the package by hand: now they agree
    _close(ours(x, s)[0], theirs(x, s)[0])
    theirs_sa, ours_sa = _twins(_pkg("attention").Attention, Attention, D, 4, 0.0, key_dim=8)
    assert (theirs_sa(x, x, x)[0] - ours_sa(x, x, x)[0]).abs().max() > 1e-3
    theirs_sa.attn_scale = 1 / math.sqrt(8)
    _close(ours_sa(x, x, x)[0], theirs_sa(x, x, x)[0])


def test_a_fully_masked_row_gives_zero_attention_not_nan():
    theirs, ours = _twins(_pkg("relational_attention").RelationalAttention, RelationalAttention, D, 4)
    x, s = _inputs()
    mask = _random_mask()
    mask[2] = False  # query 2 may see nothing
    assert torch.isnan(theirs(x, s, attn_mask=mask)[0][:, 2]).all()  # the package: NaN
    out = ours(x, s, attn_mask=mask)[0]
    assert out[:, 2].abs().max() == 0  # ours: zero attention, and wo has no bias here
    keep = torch.ones(T, dtype=torch.bool)
    keep[2] = False
    _close(out[:, keep], theirs(x, s, attn_mask=mask)[0][:, keep])


def test_key_padding_mask_equals_the_same_mask_given_as_attn_mask():
    _, ours = _twins(_pkg("relational_attention").RelationalAttention, RelationalAttention, D, 4)
    x, s = _inputs()
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[0, -2:] = False
    got = ours(x, s, key_padding_mask=kpm, is_causal=True)[0]
    for n in range(B):
        as_mask = kpm[n][None, :] & torch.ones(T, T, dtype=torch.bool).tril()
        _close(got[n:n + 1], ours(x[n:n + 1], s[n:n + 1], attn_mask=as_mask)[0])


# ---------------------------------------------------------------------------------------------------------
# RCA, disentangled RCA and dual attention
# ---------------------------------------------------------------------------------------------------------

def _mend_model_utils(monkeypatch):
    """The package's relational_attention.py calls model_utils without importing it: patch the import in."""
    ra_module = _pkg("relational_attention")
    monkeypatch.setattr(ra_module, "model_utils", _pkg("model_utils"), raising=False)
    return ra_module


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("kind", ["rca", "disrca"])
def test_rca_and_disentangled_rca_raise_name_error_in_the_package_and_equal_it_once_mended(kind, relative,
                                                                                       monkeypatch):
    ra_module = _pkg("relational_attention")
    pkg_cls = {"rca": ra_module.RelationalCrossAttention,
               "disrca": ra_module.DisentangledRelationalCrossAttention}[kind]
    our_cls = {"rca": RelationalCrossAttention, "disrca": DisentangledRelationalCrossAttention}[kind]
    with pytest.raises(NameError, match="model_utils"):
        pkg_cls(D, 4, 0.0)
    _mend_model_utils(monkeypatch)
    kwargs = dict(use_relative_positional_symbols=relative, add_bias_kv=True, add_bias_out=True)
    kwargs.update({"rca": dict(activation="softmax"), "disrca": dict(rel_activation="tanh")}[kind])
    theirs, ours = _twins(pkg_cls, our_cls, D, 4, 0.0, **kwargs)
    x, s = _inputs()
    symbols = torch.randn(T, T, D) if relative else s
    for options in ({}, dict(is_causal=True), dict(attn_mask=_random_mask())):
        for e, g in zip(theirs(x, symbols, **options), ours(x, symbols, **options)):
            _close(g, e)


def test_rca_with_a_non_softmax_activation_equals_the_mended_package(monkeypatch):
    ra_module = _mend_model_utils(monkeypatch)
    theirs, ours = _twins(ra_module.RelationalCrossAttention, RelationalCrossAttention, D, 4, 0.0,
                          activation="sigmoid", n_kv_heads=2)
    x, s = _inputs()
    for e, g in zip(theirs(x, s, is_causal=True), ours(x, s, is_causal=True)):
        _close(g, e)


def test_disentangled_rca_with_grouped_heads_works_where_the_package_fails(monkeypatch):
    ra_module = _mend_model_utils(monkeypatch)
    theirs, ours = _twins(ra_module.DisentangledRelationalCrossAttention, DisentangledRelationalCrossAttention,
                          D, 4, 0.0, n_kv_heads=2)
    x, s = _inputs()
    with pytest.raises(RuntimeError):  # its relation keys are never repeated over the query heads
        theirs(x, s)
    out, weights, relations = ours(x, s)
    # Oracle: the same module with the key heads copied out to every query head (n_kv_heads = n_heads).
    full = DisentangledRelationalCrossAttention(D, 4, 0.0).eval()
    state = ours.state_dict()
    for name in ("wk_attn.weight", "wk_rel.weight", "wv.weight"):
        state[name] = state[name].view(2, -1, D).repeat_interleave(2, dim=0).reshape(-1, D)
    full.load_state_dict(state)
    _close(out, full(x, s)[0])


DUAL_CASES = [
    dict(n_heads_sa=2, n_heads_ra=2),
    dict(n_heads_sa=0, n_heads_ra=4),
    dict(n_heads_sa=4, n_heads_ra=0),
    dict(n_heads_sa=2, n_heads_ra=2, share_attn_params=True),
    dict(n_heads_sa=1, n_heads_ra=3, sa_kwargs=dict(n_kv_heads=1, add_bias_out=True),
         ra_kwargs=dict(n_relations=2, symmetric_rels=True, rel_activation="relu", add_bias_out=True)),
]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", DUAL_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_dual_attention_equals_the_package(case, need_weights):
    theirs, ours = _twins(_pkg("dual_attention").DualAttention, DualAttention, D, dropout=0.0, **case)
    x, s = _inputs()
    cos, sin = _rope(D // 4)
    for options in (dict(is_causal=True), dict(attn_mask=_random_mask()), dict(freqs_cos=cos, freqs_sin=sin)):
        e_out, e_sa, e_ra = theirs(x, s, need_weights=need_weights, **options)
        g_out, g_sa, g_ra = ours(x, s, need_weights=need_weights, **options)
        _close(g_out, e_out)
        assert (g_sa is None) == (e_sa is None) and (g_ra is None) == (e_ra is None)
        if e_sa is not None:
            _close(g_sa, e_sa)
        for e, g in zip(e_ra or [], g_ra or []):
            _close(g, e)


@pytest.mark.parametrize("ra_type", ["rca", "disrca"])
def test_dual_attention_with_rca_types_equals_the_mended_package(ra_type, monkeypatch):
    dual_module = _pkg("dual_attention")
    with pytest.raises(NameError):
        dual_module.DualAttention(D, 2, 2, 0.0, ra_type=ra_type)
    _mend_model_utils(monkeypatch)
    theirs, ours = _twins(dual_module.DualAttention, DualAttention, D, 2, 2, 0.0, ra_type=ra_type)
    x, s = _inputs()
    _close(ours(x, s, is_causal=True)[0], theirs(x, s, is_causal=True)[0])


def test_share_attn_params_with_rca_works_where_the_mended_package_fails(monkeypatch):
    dual_module = _pkg("dual_attention")
    _mend_model_utils(monkeypatch)
    with pytest.raises(AttributeError):  # it looks for wq_attn, which RCA calls wq
        dual_module.DualAttention(D, 2, 2, 0.0, ra_type="rca", share_attn_params=True)
    ours = DualAttention(D, 2, 2, 0.0, ra_type="rca", share_attn_params=True).eval()
    assert ours.self_attention.wq is ours.relational_attention.wq
    # Oracle: the package without sharing, its sensory query/key maps overwritten with the relational ones.
    theirs = _randomize(dual_module.DualAttention(D, 2, 2, 0.0, ra_type="rca")).eval()
    with torch.no_grad():
        theirs.self_attention.wq.weight.copy_(theirs.relational_attention.wq.weight)
        theirs.self_attention.wk.weight.copy_(theirs.relational_attention.wk.weight)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, s = _inputs()
    _close(ours(x, s)[0], theirs(x, s)[0])


def test_with_no_relational_heads_dual_attention_is_torch_multihead_attention():
    torch.manual_seed(0)
    dual = DualAttention(D, n_heads_sa=4, n_heads_ra=0, dropout=0.0,
                         sa_kwargs=dict(add_bias_kv=True, add_bias_out=True)).double().eval()
    _randomize(dual)
    sa = dual.self_attention
    mha = nn.MultiheadAttention(D, 4, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([sa.wq.weight, sa.wk.weight, sa.wv.weight]))
        mha.in_proj_bias.copy_(torch.cat([torch.zeros(D, dtype=torch.float64), sa.wk.bias, sa.wv.bias]))
        mha.out_proj.weight.copy_(sa.wo.weight)
        mha.out_proj.bias.copy_(sa.wo.bias)
    x, s = _inputs(dtype=torch.float64)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # PyTorch's polarity: True = may NOT attend
    expected = mha(x, x, x, attn_mask=future, need_weights=False)[0]
    _close(dual(x, s, is_causal=True)[0], expected, FP64_TOL)
    # distinct: give two of the four heads to relational attention and the output is no longer MHA's
    mixed = _randomize(DualAttention(D, n_heads_sa=2, n_heads_ra=2, dropout=0.0)).double().eval()
    assert (mixed(x, s, is_causal=True)[0] - expected).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# Symbol retrievers
# ---------------------------------------------------------------------------------------------------------

def test_symbol_retrievers_equal_the_package():
    sr = _pkg("symbol_retrieval")
    x, _ = _inputs()
    for pkg_cls, our_cls, kwargs in (
            (sr.SymbolicAttention, SymbolicAttention, dict(d_model=D, n_heads=4, n_symbols=6)),
            (sr.SymbolicAttention, SymbolicAttention, dict(d_model=D, n_heads=2, n_symbols=3, scale=0.1)),
            (sr.PositionalSymbolRetriever, PositionalSymbolRetriever, dict(symbol_dim=D, max_length=8)),
            (sr.PositionRelativeSymbolRetriever, PositionRelativeSymbolRetriever, dict(symbol_dim=D, max_rel_pos=2))):
        theirs, ours = _twins(pkg_cls, our_cls, **kwargs)
        _close(ours(x), theirs(x))


def test_symbolic_attention_drops_out_only_in_training():
    x, _ = _inputs()
    alone = SymbolicAttention(D, 4, 6, dropout=0.5).eval()
    assert torch.equal(alone(x), alone(x))
    assert not torch.equal(alone.train()(x), alone(x))
    sr = _pkg("symbol_retrieval")
    theirs, ours = _twins(sr.SymbolicAttention, SymbolicAttention, D, 4, 6, dropout=0.5)
    torch.manual_seed(0)
    a, b = theirs(x), theirs(x)
    assert (a - b).abs().max() > 1e-3  # the package: random in eval()
    clean = _twins(sr.SymbolicAttention, SymbolicAttention, D, 4, 6, dropout=0.0)[0]
    _close(ours(x), clean(x))  # ours: in eval() it is the lookup without dropout
    assert torch.equal(ours(x), ours(x))


def test_symbols_are_position_relative_and_clipped():
    retriever = _randomize(PositionRelativeSymbolRetriever(D, max_rel_pos=2))
    table = retriever.rel_pos_enc.rel_pos_embeddings  # (5, D): relative positions -2 .. 2
    s = retriever(torch.zeros(1, 6, D))  # (6, 6, D)
    for i in range(6):
        for j in range(6):
            assert torch.equal(s[i, j], table[min(max(j - i, -2), 2) + 2]), (i, j)
    # with an offset (a KV cache), row i is the query at position offset + i, against keys 0 .. offset + T - 1
    assert torch.equal(retriever(torch.zeros(1, 2, D), offset=4), s[4:6])


def test_sinusoidal_positional_symbols_are_the_sinusoid_and_learn_nothing():
    sr = _pkg("symbol_retrieval")
    ours = PositionalSymbolRetriever(D, 8, sinusoidal=True)
    assert len(ours.state_dict()) == 0 and not list(ours.parameters())
    got = ours(torch.zeros(1, 8, D))[0]
    for p in range(8):
        for k in range(D // 2):
            angle = p / 10000 ** (2 * k / D)
            assert abs(got[p, 2 * k] - math.sin(angle)) < 1e-6 and abs(got[p, 2 * k + 1] - math.cos(angle)) < 1e-6
    theirs = sr.PositionalSymbolRetriever(D, 8, sinusoidal=True)  # the package: a learned table after all
    assert "symbol_library.weight" in theirs.state_dict()


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------

ENC_CASES = [
    dict(norm_first=True, norm_type="layernorm", activation="relu", causal=True),
    dict(norm_first=False, norm_type="rmsnorm", activation="gelu", causal=False),
    dict(norm_first=True, norm_type="rmsnorm", activation="swiglu", causal=True, bias=False,
         ra_kwargs=dict(symmetric_rels=True, n_relations=2), sa_kwargs=dict(n_kv_heads=1)),
    dict(norm_first=False, norm_type="layernorm", activation="silu", causal=True, n_heads_sa=0, n_heads_ra=4),
]


@pytest.mark.parametrize("case", ENC_CASES, ids=lambda c: f"{c['norm_first']},{c['norm_type']},{c['activation']}")
def test_encoder_block_equals_the_package(case):
    kwargs = dict(d_model=D, n_heads_sa=2, n_heads_ra=2, dff=24, dropout_rate=0.0)
    kwargs.update(case)
    theirs, ours = _twins(_pkg("dual_attn_blocks").DualAttnEncoderBlock, DualAttnEncoderBlock, scale=0.3, **kwargs)
    x, s = _inputs()
    _close(ours(x, s), theirs(x, s))
    cos, sin = _rope(D // 4)
    _close(ours(x, s, freqs_cos=cos, freqs_sin=sin), theirs(x, s, freqs_cos=cos, freqs_sin=sin))


@pytest.mark.parametrize("norm_first", [True, False])
def test_blocks_compose_as_written(norm_first):
    """Pre-norm: x + DA(LN1 x), then + FF(LN2 .); post-norm: LN1(x + DA(x)), then LN2(. + FF(.)); decoder with
    cross-attention between. Composed here from the blocks' own parts, in float64."""
    torch.manual_seed(0)
    enc = _randomize(DualAttnEncoderBlock(D, 2, 2, 24, "gelu", 0.0, norm_first, causal=True), 0.3).double().eval()
    dec = _randomize(DualAttnDecoderBlock(D, 2, 2, 4, 24, "relu", 0.0, norm_first), 0.3).double().eval()
    x, s = _inputs(dtype=torch.float64)
    context = torch.randn(B, 7, D, dtype=torch.float64)
    da = lambda block, h: block.dual_attn(h, s, is_causal=True)[0]  # noqa: E731
    cross = lambda h: dec.cross_attn(h, context, context)[0]  # noqa: E731
    if norm_first:
        h = x + da(enc, enc.norm1(x))
        want_enc = h + enc.ff_block(enc.norm2(h))
        h = x + da(dec, dec.norm1(x))
        h = h + cross(dec.norm2(h))
        want_dec = h + dec.ff_block(dec.norm3(h))
    else:
        h = enc.norm1(x + da(enc, x))
        want_enc = enc.norm2(h + enc.ff_block(h))
        h = dec.norm1(x + da(dec, x))
        h = dec.norm2(h + cross(h))
        want_dec = dec.norm3(h + dec.ff_block(h))
    _close(enc(x, s), want_enc, FP64_TOL)
    _close(dec(x, context, s), want_dec, FP64_TOL)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_block_equals_the_package(norm_first):
    kwargs = dict(d_model=D, n_heads_sa=2, n_heads_ra=2, n_heads_cross=4, dff=24, activation="gelu",
                  dropout_rate=0.0, norm_first=norm_first, cross_kwargs=dict(add_bias_out=True))
    theirs, ours = _twins(_pkg("dual_attn_blocks").DualAttnDecoderBlock, DualAttnDecoderBlock, scale=0.3, **kwargs)
    x, s = _inputs()
    context = torch.randn(B, 7, D)
    _close(ours(x, context, s), theirs(x, context, symbols=s))
    # RoPE: the package's decoder block has no way to take it; ours applies it to the dual-attention heads
    cos, sin = _rope(D // 4)
    assert (ours(x, context, s, freqs_cos=cos, freqs_sin=sin) - ours(x, context, s)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

def _lm_kwargs(retrieval="symbolic_attention", pos="pos_emb", **overrides):
    retrieval_kwargs = {"symbolic_attention": dict(d_model=D, n_heads=2, n_symbols=5),
                        "positional_symbols": dict(symbol_dim=D, max_length=12),
                        "position_relative": dict(symbol_dim=D, max_rel_pos=3)}[retrieval]
    kwargs = dict(vocab_size=13, d_model=D, n_layers=2, n_heads_sa=2, n_heads_ra=2,
                  symbol_retrieval_kwargs=retrieval_kwargs, dff=32, dropout_rate=0.0, activation="gelu",
                  norm_first=True, max_block_size=12, symbol_retrieval=retrieval, pos_enc_type=pos)
    if retrieval == "position_relative":
        kwargs["ra_kwargs"] = dict(use_relative_positional_symbols=True)  # the package needs it spelled out
    kwargs.update(overrides)
    return kwargs


LM_CASES = [
    dict(retrieval="symbolic_attention", pos="pos_emb"),
    dict(retrieval="positional_symbols", pos="RoPE", activation="swiglu", norm_type="rmsnorm"),
    dict(retrieval="position_relative", pos="RoPE", norm_first=False),
    dict(retrieval="symbolic_attention", pos="RoPE", symbol_retriever_config=dict(shared_symbol_retriever=False,
                                                                                  weight_tie_symbol_library=True)),
    dict(retrieval="positional_symbols", pos="pos_emb", n_heads_sa=4, n_heads_ra=0),
    dict(retrieval="positional_symbols", pos="pos_emb", n_heads_sa=2, n_heads_ra=2, share_attn_params=True,
         ra_kwargs=dict(symmetric_rels=True)),
]


@pytest.mark.parametrize("case", LM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_language_model_equals_the_package(case):
    theirs, ours = _twins(_pkg("language_models").DualAttnTransformerLM, DualAttnTransformerLM, scale=0.2,
                          **_lm_kwargs(**case))
    idx = torch.randint(0, 13, (B, 7), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 13, (B, 7), generator=torch.Generator().manual_seed(4))
    e_logits, e_loss = theirs(idx, targets)
    g_logits, g_loss = ours(idx, targets)
    _close(g_logits, e_logits)
    _close(g_loss, e_loss)
    assert ours.get_num_params() == theirs.get_num_params()


def test_language_model_fixes_the_package():
    no_bias = DualAttnTransformerLM(**_lm_kwargs(bias=False))
    assert not any(k.endswith(".bias") and "ff_block" in k for k in no_bias.state_dict())
    lm_module = _pkg("language_models")
    # position_relative symbols without use_relative_positional_symbols: the package fails inside an einsum
    kwargs = _lm_kwargs("position_relative")
    del kwargs["ra_kwargs"]
    idx = torch.randint(0, 13, (B, 6))
    with pytest.raises(Exception):
        lm_module.DualAttnTransformerLM(**kwargs)(idx)
    assert DualAttnTransformerLM(**kwargs)(idx)[0].shape == (B, 6, 13)
    # bias=False: the package keeps the feed-forward biases, ours drops them
    theirs = lm_module.DualAttnTransformerLM(**_lm_kwargs(bias=False))
    ours = DualAttnTransformerLM(**_lm_kwargs(bias=False))
    assert any(k.endswith("ff_block.linear1.bias") for k in theirs.state_dict())
    assert not any(k.endswith(".bias") and "ff_block" in k for k in ours.state_dict())
    # the embedding dropout is applied (the package builds it and never calls it)
    calls = []
    ours.layers.dropout.register_forward_hook(lambda *args: calls.append(1))
    theirs.layers.dropout.register_forward_hook(lambda *args: calls.append(2))
    ours(idx), theirs(idx)
    assert calls == [1]
    # estimate_mfu: the package's is the placeholder -1; ours a real number
    assert theirs.estimate_mfu(4, 0.5) == -1
    assert ours.estimate_mfu(4, 0.5) > 0


def test_estimate_mfu_is_the_palm_formula_without_relational_heads_and_counts_relational_work():
    n_layers, heads, block = 2, 4, 12
    sa_only = DualAttnTransformerLM(**_lm_kwargs("positional_symbols", n_heads_sa=4, n_heads_ra=0))
    n = sa_only.get_num_params()
    palm = (6 * n + 12 * n_layers * heads * (D // heads) * block) * block * 3 / 0.25 / 312e12  # 3 iters in 0.25 s
    assert abs(sa_only.estimate_mfu(3, 0.25) - palm) <= 1e-12 * palm
    # relational heads: scores Dk, relations R Dr, relation sum R and symbol sum Dh, per head, per key
    dual = DualAttnTransformerLM(**_lm_kwargs("positional_symbols", n_heads_sa=2, n_heads_ra=2))
    hd = D // 4
    per_layer = 2 * 2 * (hd + hd) * block + 2 * block * (2 * hd + 2 * (2 * hd // 2) + 2 * 2 + 2 * hd)
    flops = (6 * dual.get_num_params() + 3 * n_layers * per_layer) * block * 3
    assert abs(dual.estimate_mfu(3, 0.25) - flops / 0.25 / 312e12) <= 1e-12 * flops


@pytest.mark.parametrize("case", [dict(retrieval="symbolic_attention", pos="pos_emb"),
                                  dict(retrieval="positional_symbols", pos="RoPE", n_heads_sa=1, n_heads_ra=3,
                                       sa_kwargs=dict(n_kv_heads=1), ra_kwargs=dict(n_kv_heads=1)),
                                  dict(retrieval="position_relative", pos="RoPE"),
                                  dict(retrieval="positional_symbols", pos="pos_emb", ra_type="disrca")],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_cached_generation_gives_the_same_tokens(case):
    torch.manual_seed(0)
    lm = DualAttnTransformerLM(**_lm_kwargs(**case)).eval()
    _randomize(lm, 0.3)
    prompt = torch.randint(0, 13, (B, 3), generator=torch.Generator().manual_seed(5))
    # the logits of the cached forward, token by token, equal one uncached forward over the whole sequence
    full = lm(torch.cat([prompt, prompt], dim=1))[0]
    cache = [dict() for _ in range(lm.n_layers)]
    steps = [lm(prompt, kv_cache=cache)[0]] + [lm(prompt[:, i:i + 1], kv_cache=cache)[0] for i in range(3)]
    _close(torch.cat(steps, dim=1), full)
    for top_k in (None, 3):  # 14 new tokens: past max_block_size = 12, so the window slides at the end
        torch.manual_seed(7)
        cached = lm.generate(prompt, 14, temperature=0.8, top_k=top_k)
        torch.manual_seed(7)
        uncached = lm.generate(prompt, 14, temperature=0.8, top_k=top_k, use_cache=False)
        assert torch.equal(cached, uncached)


def _s2s_kwargs(retrieval="positional_symbols", n_layers_dec=2, tie_weights=False):
    retrieval_kwargs = {"symbolic_attention": dict(d_model=D, n_heads=2, n_symbols=5),
                        "positional_symbols": dict(symbol_dim=D, max_length=10),
                        "position_relative": dict(symbol_dim=D, max_rel_pos=3)}[retrieval]
    block = dict(n_heads_sa=2, n_heads_ra=2, dff=24, activation="relu", dropout_rate=0.0, norm_first=True)
    encoder_kwargs, decoder_kwargs = dict(block), dict(block, n_heads_cross=2)
    if retrieval == "position_relative":
        encoder_kwargs["ra_kwargs"] = decoder_kwargs["ra_kwargs"] = dict(use_relative_positional_symbols=True)
    return dict(input_spec=dict(type="token", vocab_size=11), output_spec=dict(type="token", vocab_size=9),
                symbol_retrieval=retrieval, symbol_retrieval_kwargs=retrieval_kwargs, d_model=D, out_dim=9,
                n_layers_enc=2, n_layers_dec=n_layers_dec, encoder_kwargs=encoder_kwargs,
                decoder_kwargs=decoder_kwargs, in_block_size=10, out_block_size=8, tie_weights=tie_weights)


@pytest.mark.parametrize("retrieval", ["symbolic_attention", "positional_symbols", "position_relative"])
def test_seq2seq_equals_the_package(retrieval):
    theirs, ours = _twins(_pkg("seq2seq_models").Seq2SeqDualAttnTransformer, Seq2SeqDualAttnTransformer,
                          scale=0.2, **_s2s_kwargs(retrieval))
    src = torch.randint(0, 11, (B, 9), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 9, (B, 6), generator=torch.Generator().manual_seed(2))
    for targets in (None, torch.randint(0, 9, (B, 6), generator=torch.Generator().manual_seed(3))):
        (e_logits, e_loss), (g_logits, g_loss) = theirs(src, tgt, targets), ours(src, tgt, targets)
        _close(g_logits, e_logits)
        assert (e_loss is None) == (g_loss is None)
        if e_loss is not None:
            _close(g_loss, e_loss)
    assert ours.estimate_mfu(1, 1.0) > 0 and theirs.estimate_mfu(1, 1.0) == -1.0


def test_seq2seq_fixes_the_package():
    assert len(Seq2SeqDualAttnTransformer(**_s2s_kwargs(n_layers_dec=3)).layers.decoder_blocks) == 3
    tied = Seq2SeqDualAttnTransformer(**dict(_s2s_kwargs(), tie_weights=True))
    assert tied.layers.target_embedder.weight is tied.layers.final_out.weight
    pkg_cls = _pkg("seq2seq_models").Seq2SeqDualAttnTransformer
    # n_layers_dec: the package builds n_layers_enc decoder blocks
    assert len(pkg_cls(**_s2s_kwargs(n_layers_dec=3)).layers.decoder_blocks) == 2
    # tie_weights: the package sets a stray attribute `.weights` and ties nothing
    theirs = pkg_cls(**dict(_s2s_kwargs(), tie_weights=True))
    assert theirs.layers.target_embedder.weight is not theirs.layers.final_out.weight
    ours = Seq2SeqDualAttnTransformer(**dict(_s2s_kwargs(), tie_weights=True))
    assert ours.layers.target_embedder.weight is ours.layers.final_out.weight
    with pytest.raises(ValueError, match="tie_weights"):
        Seq2SeqDualAttnTransformer(**dict(_s2s_kwargs(), tie_weights=True, out_dim=7))


@pytest.mark.parametrize("retrieval", ["symbolic_attention", "positional_symbols", "position_relative"])
def test_vision_model_equals_the_package(retrieval):
    retrieval_kwargs = {"symbolic_attention": dict(d_model=D, n_heads=2, n_symbols=5),
                        "positional_symbols": dict(symbol_dim=D, max_length=10),
                        "position_relative": dict(symbol_dim=D, max_rel_pos=4)}[retrieval]
    kwargs = dict(image_shape=(3, 36, 36), patch_size=(12, 12), num_classes=4, d_model=D, n_layers=2, n_heads_sa=2,
                  n_heads_ra=2, dff=24, dropout_rate=0.0, activation="gelu", norm_first=True,
                  symbol_retrieval=retrieval, symbol_retrieval_kwargs=retrieval_kwargs,
                  ra_kwargs=dict(symmetric_rels=True, use_relative_positional_symbols=retrieval == "position_relative"))
    theirs, ours = _twins(_pkg("vision_models").VisionDualAttnTransformer, VisionDualAttnTransformer, scale=0.2,
                          **kwargs)
    images = torch.randn(B, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    _close(ours(images), theirs(images))
    # non-square images and patches: (channels, width, height) and (width, height), the package's order
    kwargs.update(image_shape=(3, 24, 36), patch_size=(12, 6), pool="mean")
    kwargs["symbol_retrieval_kwargs"] = dict(retrieval_kwargs, max_length=13) if retrieval == "positional_symbols" \
        else retrieval_kwargs
    theirs, ours = _twins(_pkg("vision_models").VisionDualAttnTransformer, VisionDualAttnTransformer, scale=0.2,
                          **kwargs)
    images = torch.randn(B, 3, 36, 24, generator=torch.Generator().manual_seed(2))
    _close(ours(images), theirs(images))
