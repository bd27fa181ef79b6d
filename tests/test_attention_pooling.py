"""Tests for mechanisms/attention_pooling.py (learned-query pooling; Nadaraya-Watson regression).

Oracles: mean pooling over the real tokens when the queries are zero; an explicit per-head loop
of softmax-weighted sums; Nadaraya-Watson as an explicit double loop with the Gaussian kernel.
"""

import math

import pytest
import torch

from mechanisms.attention_pooling import AttentionPooling, nadaraya_watson

TOL64 = 1e-10  # float64: only the order of summation differs


def _module(d_model=8, num_queries=2, num_heads=2, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    pool = AttentionPooling(d_model, num_queries=num_queries, num_heads=num_heads, bias=bias,
                            dropout=dropout).double()
    with torch.no_grad():
        for name, p in pool.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return pool


def _data(B=3, T=6, d=8, lengths=(6, 4, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    mask = torch.arange(T) < torch.tensor(lengths)[:, None]  # (B, T)
    return x, mask


def _loop_oracle(pool, x, mask):
    """Per batch, query and head: softmax over the real tokens of p . k / sqrt(Dh), then sum of values."""
    B, T, d = x.shape
    H, Q, Dh = pool.num_heads, pool.num_queries, pool.head_dim
    k, v = pool.k_proj(x), pool.v_proj(x)
    out = torch.zeros(B, Q, d, dtype=x.dtype)
    with torch.no_grad():
        for b in range(B):
            for q in range(Q):
                cat = torch.zeros(d, dtype=x.dtype)
                for h in range(H):
                    sl = slice(h * Dh, (h + 1) * Dh)
                    real = [t for t in range(T) if mask[b, t]]
                    e = [float(pool.queries[q, sl] @ k[b, t, sl]) / math.sqrt(Dh) for t in real]
                    m = max(e)
                    z = sum(math.exp(s - m) for s in e)
                    for n, t in enumerate(real):
                        cat[sl] += math.exp(e[n] - m) / z * v[b, t, sl]
                out[b, q] = pool.out_proj(cat)
    return out


def test_zero_queries_give_the_mean_over_the_real_tokens():
    pool = _module()
    x, mask = _data()
    with torch.no_grad():
        pool.queries.zero_()
        v = pool.v_proj(x)
        expected = torch.stack([pool.out_proj(v[b, mask[b]].mean(dim=0)) for b in range(3)])  # (B, d)
    for nw in (False, True):
        res = pool(x, key_padding_mask=mask, need_weights=nw)
        out = res[0] if nw else res
        assert torch.allclose(out, expected.unsqueeze(1).expand(3, 2, 8), atol=TOL64, rtol=0)


def test_matches_explicit_loop_and_both_paths_agree():
    pool = _module()
    x, mask = _data()
    expected = _loop_oracle(pool, x, mask)
    fused = pool(x, key_padding_mask=mask)
    explicit, w = pool(x, key_padding_mask=mask, need_weights=True)
    assert torch.allclose(explicit, expected, atol=TOL64, rtol=0)
    assert torch.allclose(fused, expected, atol=TOL64, rtol=0)
    assert w.shape == (3, 2, 2, 6)
    assert torch.allclose(w.sum(-1), torch.ones(3, 2, 2, dtype=torch.float64), atol=1e-12)


def test_four_dim_mask_equals_the_key_padding_mask_and_they_combine_by_and():
    pool = _module()
    x, mask = _data()
    assert torch.equal(pool(x, key_padding_mask=mask), pool(x, mask=mask.view(3, 1, 1, 6)))
    # a per-head, per-query mask is accepted too, and ANDed with the key padding
    rich = torch.rand(3, 2, 2, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    rich[..., 0] = True
    _, w = pool(x, mask=rich, key_padding_mask=mask, need_weights=True)
    assert (w.masked_select(~(rich & mask[:, None, None, :])) == 0).all()
    assert torch.equal(w, pool(x, mask=rich & mask[:, None, None, :], need_weights=True)[1])


def test_a_two_dim_mask_is_per_query_and_padding_goes_in_key_padding_mask_even_when_batch_equals_q():
    # The project's rule: a 2-D `mask` is (Q, T), one row per pooling query, shared by the batch; a (B, T)
    # padding mask goes in `key_padding_mask`. With B == Q == 3 the two readings of one tensor differ,
    # and each matches the loop oracle read the right way.
    pool = _module(num_queries=3)
    x, padding = _data()  # B = 3, padding (B, T) with lengths 6, 4, 1
    per_batch = _loop_oracle(pool, x, padding)
    assert torch.allclose(pool(x, key_padding_mask=padding), per_batch, atol=TOL64, rtol=0)
    _, w = pool(x, mask=padding, need_weights=True)  # (Q, T): query q sees the first 6, 4, 1 tokens
    for q, n in enumerate((6, 4, 1)):
        assert (w[:, :, q, n:] == 0).all() and (w[:, :, q, :n] > 0).all()
    assert (pool(x, mask=padding) - per_batch).abs().max() > 1e-3, "the two readings should differ"
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(B, Tk\) = \(3, 6\)"):
        _module(num_queries=2)(x, mask=padding)  # (B, T) with B != Q: refused, pointing to key_padding_mask


def test_permuting_the_real_tokens_changes_nothing():
    # Pooling is a set operation: the order of the tokens does not matter (no positions inside).
    pool = _module()
    x, _ = _data()
    perm = torch.randperm(6)
    assert torch.allclose(pool(x), pool(x[:, perm]), atol=TOL64, rtol=0)


def test_distinct_from_mean_pooling_and_from_self_attention_pooled():
    # Outside its limit case (non-zero queries) it is not mean pooling, and it is not plain
    # multi-head self-attention followed by a mean either (same projections, W_q = I on the tokens).
    pool = _module()
    x, mask = _data()
    with torch.no_grad():
        v = pool.v_proj(x)
        mean = torch.stack([pool.out_proj(v[b, mask[b]].mean(dim=0)) for b in range(3)])  # (B, d)
        out = pool(x, key_padding_mask=mask)
        assert (out - mean.unsqueeze(1)).abs().max() > 1e-3
        k = pool.k_proj(x).view(3, 6, 2, 4).transpose(1, 2)  # (B, H, T, Dh)
        q = x.view(3, 6, 2, 4).transpose(1, 2)
        pad = mask.view(3, 1, 1, 6)
        w = torch.softmax((q @ k.transpose(-2, -1) / 2.0).masked_fill(~pad, float("-inf")), dim=-1)
        heads = w @ v.view(3, 6, 2, 4).transpose(1, 2)  # (B, H, T, Dh)
        mha = pool.out_proj(heads.transpose(1, 2).reshape(3, 6, 8))  # (B, T, d)
        mha_pooled = torch.stack([mha[b, mask[b]].mean(dim=0) for b in range(3)])
        assert (out - mha_pooled.unsqueeze(1)).abs().max() > 1e-3


def test_every_constructor_argument_changes_the_output():
    x, mask = _data()
    base = _module(num_queries=2, num_heads=2)
    out = base(x, key_padding_mask=mask)
    assert out.shape == (3, 2, 8)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-6, "the queries must differ from each other"
    assert _module(num_queries=3)(x, key_padding_mask=mask).shape == (3, 3, 8), "num_queries"
    one_head = _module(num_heads=1)
    one_head.load_state_dict(base.state_dict())
    assert (one_head(x, key_padding_mask=mask) - out).abs().max() > 1e-6, "num_heads"
    no_bias = _module(bias=False)
    no_bias.load_state_dict(base.state_dict(), strict=False)
    assert (no_bias(x, key_padding_mask=mask) - out).abs().max() > 1e-6, "bias"
    assert _module(d_model=4, num_heads=1)(torch.randn(1, 3, 4, dtype=torch.float64)).shape == (1, 2, 4), "d_model"


def test_constructor_refuses_zero_queries():
    with pytest.raises(ValueError, match="num_queries"):
        AttentionPooling(8, num_queries=0)


def _nw_loop(xq, xt, yt, h):
    out = []
    for x in xq.tolist():
        k = [math.exp(-((x - xi) / h) ** 2 / 2) for xi in xt.tolist()]
        out.append(sum(ki * yi for ki, yi in zip(k, yt.tolist())) / sum(k))
    return torch.tensor(out, dtype=torch.float64)


def test_nadaraya_watson_matches_explicit_loop():
    g = torch.Generator().manual_seed(0)
    xt = torch.rand(30, generator=g, dtype=torch.float64) * 5
    yt = torch.sin(xt) + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    xq = torch.linspace(0, 5, 17, dtype=torch.float64)
    for h in (0.1, 0.5, 2.0):
        assert torch.allclose(nadaraya_watson(xq, xt, yt, h), _nw_loop(xq, xt, yt, h), atol=1e-12, rtol=0)


def test_nadaraya_watson_limits_and_shapes():
    g = torch.Generator().manual_seed(0)
    xt = torch.rand(20, 2, generator=g, dtype=torch.float64)
    yt = torch.randn(20, 3, generator=g, dtype=torch.float64)
    # a huge bandwidth weighs every point equally: the global mean
    assert torch.allclose(nadaraya_watson(xt[:4], xt, yt, 1e6), yt.mean(0).expand(4, 3), atol=1e-9)
    # a tiny bandwidth at a training point returns that point's target
    assert torch.allclose(nadaraya_watson(xt[:4], xt, yt, 1e-3), yt[:4], atol=1e-9)
    with pytest.raises(ValueError, match="bandwidth"):
        nadaraya_watson(xt, xt, yt, 0.0)
    with pytest.raises(ValueError, match="x_train"):
        nadaraya_watson(xt, xt[:, :1], yt, 1.0)
    with pytest.raises(ValueError, match="y_train"):
        nadaraya_watson(xt, xt, yt[:5], 1.0)
