"""Tests for mechanisms/relative_position.py (Shaw et al. 2018 and T5's bucketed relative bias).

Oracles written here: Shaw's eq. (2)-(3) as an explicit loop over (batch, head, query, key); the T5
bucket function evaluated by hand from its definition (values in the tables below); plain multi-head
attention from the module's projection weights.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mechanisms.relative_position import (ShawRelativeAttention, T5RelativeAttention,
                                          t5_relative_position_bucket)

TOL64 = 1e-10  # float64, a whole attention layer


def projections(mod, query, key):
    B, Tq, D = query.shape
    Tk = key.shape[1]
    H = mod.num_heads
    Dh = D // H
    q = mod.q_proj(query).view(B, Tq, H, Dh).transpose(1, 2)
    k = mod.k_proj(key).view(B, Tk, H, Dh).transpose(1, 2)
    v = mod.v_proj(key).view(B, Tk, H, Dh).transpose(1, 2)
    return q, k, v


def plain_mha(mod, x, scale, allowed=None):
    B, T, D = x.shape
    q, k, v = projections(mod, x, x)
    s = q @ k.transpose(-1, -2) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return mod.out_proj((w @ v).transpose(1, 2).reshape(B, T, D))


def shaw_loop(mod, query, key, causal=False, allowed=None):
    """eq. (1)-(3) of Shaw et al., one (b, h, i, j) at a time; `allowed` (B, Tq, Tk) bool or None."""
    B, Tq, D = query.shape
    Tk = key.shape[1]
    H, K = mod.num_heads, mod.max_relative_position
    Dh = D // H
    q, k, v = projections(mod, query, key)
    z = torch.zeros(B, H, Tq, Dh, dtype=query.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                pi = i + Tk - Tq
                js = [j for j in range(Tk) if (not causal or j <= pi) and (allowed is None or allowed[b, i, j])]
                e = torch.stack([q[b, h, i] @ (k[b, h, j] + mod.rel_key[max(-K, min(K, j - pi)) + K])
                                 / math.sqrt(Dh) for j in js])
                alpha = torch.softmax(e, 0)
                for a, j in zip(alpha, js):
                    z[b, h, i] += a * (v[b, h, j] + mod.rel_value[max(-K, min(K, j - pi)) + K])
    return mod.out_proj(z.transpose(1, 2).reshape(B, Tq, D))


def make_shaw(d_model=8, num_heads=2, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    return ShawRelativeAttention(d_model, num_heads, k, **kw)


def make_t5(d_model=8, num_heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_buckets", 8)
    kw.setdefault("max_distance", 16)
    return T5RelativeAttention(d_model, num_heads, **kw)


# ------------------------------------------------------------------ T5 bucket function by hand
# num_buckets=32, max_distance=128, bidirectional: 16 buckets per direction, exact below 8, then
# 8 + floor(8 * log(n/8) / log(16)) = 8 + floor(2 * log2(n / 8)), capped at 15; +16 for keys after the query.
HAND_BIDIRECTIONAL = {0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -16: 10, -22: 10, -23: 11, -32: 12,
                      -45: 12, -46: 13, -64: 14, -90: 14, -91: 15, -127: 15, -128: 15, -1000: 15,
                      1: 17, 7: 23, 8: 24, 12: 25, 16: 26, 91: 31, 5000: 31}
# unidirectional: 32 buckets, exact below 16, then 16 + floor(16 * log(n/16) / log(8)), capped at 31;
# keys after the query (j - i > 0) all go to bucket 0.
HAND_UNIDIRECTIONAL = {0: 0, 3: 0, 100: 0, -1: 1, -15: 15, -16: 16, -20: 17, -32: 21, -64: 26,
                       -127: 31, -128: 31, -500: 31}


@pytest.mark.parametrize("bidirectional,table", [(True, HAND_BIDIRECTIONAL), (False, HAND_UNIDIRECTIONAL)])
def test_t5_buckets_match_hand_derived_values(bidirectional, table):
    rel = torch.tensor(list(table))
    got = t5_relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert got.tolist() == list(table.values())


def test_t5_buckets_properties():
    rel = torch.arange(-300, 301)
    b = t5_relative_position_bucket(rel)
    assert b.min() == 0 and b.max() == 31
    # monotone in distance within each direction, exact below num_buckets / 4 = 8
    back = b[rel <= 0].flip(0)   # distances 0, 1, 2, ...
    assert (back[1:] >= back[:-1]).all() and back[:8].tolist() == list(range(8))
    ahead = b[rel > 0]
    assert (ahead[1:] >= ahead[:-1]).all() and ahead[:7].tolist() == list(range(17, 24))
    # clipping at max_distance: every distance >= 128 shares the last bucket of its direction
    assert (b[rel <= -128] == 15).all() and (b[rel >= 128] == 31).all() and (b[rel.abs() < 91] < 31).all()
    # small settings, e.g. 8 buckets: exact 0, 1 then log buckets up to max_distance 16
    small = t5_relative_position_bucket(torch.tensor([0, -1, -2, -5, -6, -15, -16, 1, 2]), True, 8, 16)
    assert small.tolist() == [0, 1, 2, 2, 3, 3, 3, 5, 6]


# ------------------------------------------------------------------ oracles and limit cases
@pytest.mark.parametrize("causal", [False, True])
def test_shaw_equals_explicit_double_loop(causal):
    mod = make_shaw(k=2).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)   # distances up to 5 > k: clipping is exercised
    expected = shaw_loop(mod, x, x, causal)
    out, w = mod(x, is_causal=causal, need_weights=True)
    assert (out - expected).abs().max() < TOL64
    assert (mod(x[:, -2:], x, is_causal=causal) - expected[:, -2:]).abs().max() < TOL64  # queries = last keys


def test_shaw_distances_beyond_k_share_a_representation():
    small = make_shaw(k=2).double()
    big = make_shaw(k=5).double()
    big.load_state_dict({n: p for n, p in small.state_dict().items() if not n.startswith("rel_")},
                        strict=False)
    with torch.no_grad():
        for r in range(-5, 6):   # big's row for distance r holds small's row for clip(r, -2, 2)
            big.rel_key[r + 5] = small.rel_key[max(-2, min(2, r)) + 2]
            big.rel_value[r + 5] = small.rel_value[max(-2, min(2, r)) + 2]
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    assert (small(x) - big(x)).abs().max() < TOL64
    with torch.no_grad():
        big.rel_key[0] += 1.0     # distance -5 now differs from -2
    assert (small(x) - big(x)).abs().max() > 1e-6


def test_zero_tables_equal_plain_attention():
    shaw = make_shaw().double()
    t5 = make_t5().double()
    with torch.no_grad():
        shaw.rel_key.zero_()
        shaw.rel_value.zero_()
        t5.relative_attention_bias.weight.zero_()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    assert (shaw(x) - plain_mha(shaw, x, 1 / math.sqrt(4))).abs().max() < TOL64
    assert (shaw(x, is_causal=True) - plain_mha(shaw, x, 1 / math.sqrt(4), causal)).abs().max() < TOL64
    assert (t5(x) - plain_mha(t5, x, 1.0)).abs().max() < TOL64               # T5: no 1/sqrt(Dh)
    assert (t5(x, is_causal=True) - plain_mha(t5, x, 1.0, causal)).abs().max() < TOL64


def test_t5_equals_explicit_bias_formula():
    mod = make_t5(num_buckets=8, max_distance=16).double()
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    q, k, v = projections(mod, x, x)
    T = 20
    bias = torch.zeros(2, T, T, dtype=torch.float64)
    for h in range(2):
        for i in range(T):
            for j in range(T):
                n = abs(j - i)   # bidirectional, 4 buckets per direction, exact below 2
                bucket = n if n < 2 else min(3, 2 + int(math.log(n / 2) / math.log(8) * 2))
                bucket += 4 if j > i else 0
                bias[h, i, j] = mod.relative_attention_bias.weight[bucket, h]
    w = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
    expected = mod.out_proj((w @ v).transpose(1, 2).reshape(2, T, 8))
    out, weights = mod(x, need_weights=True)
    assert (mod(x) - expected).abs().max() < TOL64 and (out - expected).abs().max() < TOL64
    assert (weights - w).abs().max() < TOL64


@pytest.mark.parametrize("maker", [make_shaw, make_t5])
def test_shifting_all_positions_changes_nothing(maker):
    mod = maker().double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    base = mod(x, positions=torch.arange(7))
    for shift in (1, 13, 500):
        assert (mod(x, positions=torch.arange(7) + shift) - base).abs().max() < TOL64
    per_seq = torch.stack([torch.arange(7) + 3, torch.arange(7) + 40])       # (B, T) positions
    assert (mod(x, positions=per_seq) - base).abs().max() < TOL64
    gapped = torch.tensor([0, 1, 2, 3, 10, 11, 12])                          # but distances matter
    assert (mod(x, positions=gapped) - base).abs().max() > 1e-6


@pytest.mark.parametrize("maker", [make_shaw, make_t5])
def test_distinct_from_plain_multi_head_attention(maker):
    mod = maker().double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    for scale in (1.0, 0.5):
        assert (mod(x) - plain_mha(mod, x, scale)).abs().max() > 1e-3


# ------------------------------------------------------------------ masks


# ------------------------------------------------------------------ arguments, dropout, positions


def _fill_by_distance(mod):
    """Deterministic tables that depend on the clipped distance / bucket, so arguments can be compared."""
    with torch.no_grad():
        if isinstance(mod, ShawRelativeAttention):
            K = mod.max_relative_position
            r = torch.arange(-K, K + 1, dtype=torch.float32).view(-1, 1)
            mod.rel_key.copy_(torch.sin(r * torch.arange(1, mod.head_dim + 1)))
            mod.rel_value.copy_(torch.cos(r * torch.arange(1, mod.head_dim + 1)))
        else:
            b = torch.arange(mod.num_buckets, dtype=torch.float32).view(-1, 1)
            mod.relative_attention_bias.weight.copy_(torch.sin(b * torch.arange(1, mod.num_heads + 1)))
    return mod


def test_every_constructor_argument_changes_the_output_shaw():
    x = torch.randn(2, 9, 8)
    ref = _fill_by_distance(make_shaw(k=2))
    base = ref(x)

    def variant(**kw):
        args = dict(d_model=8, num_heads=2, max_relative_position=2, dropout=0.0, bias=True)
        args.update(kw)
        mod = ShawRelativeAttention(**args)
        mod.load_state_dict({n: p for n, p in ref.state_dict().items() if not n.startswith("rel_")},
                            strict=False)
        return _fill_by_distance(mod)

    assert torch.equal(variant()(x), base)
    assert not torch.allclose(variant(max_relative_position=3)(x), base)
    assert not torch.allclose(variant(num_heads=4)(x), base)
    assert not torch.allclose(variant(bias=False)(x), base)
    assert not torch.allclose(variant(dropout=0.5).train()(x), base)
    assert make_shaw(d_model=12, num_heads=3)(torch.randn(2, 5, 12)).shape == (2, 5, 12)


def test_every_constructor_argument_changes_the_output_t5():
    x = torch.randn(2, 12, 8)
    ref = _fill_by_distance(make_t5(num_buckets=8, max_distance=16))
    base = ref(x)

    def variant(**kw):
        args = dict(d_model=8, num_heads=2, num_buckets=8, max_distance=16, bidirectional=True,
                    dropout=0.0, bias=True)
        args.update(kw)
        mod = T5RelativeAttention(**args)
        mod.load_state_dict({n: p for n, p in ref.state_dict().items() if "relative" not in n}, strict=False)
        return _fill_by_distance(mod)

    assert torch.equal(variant()(x), base)
    assert not torch.allclose(variant(num_buckets=12)(x), base)
    assert not torch.allclose(variant(max_distance=6)(x), base)
    assert not torch.allclose(variant(bidirectional=False)(x), base)
    assert not torch.allclose(variant(num_heads=4)(x), base)
    assert not torch.allclose(variant(bias=False)(x), base)
    assert not torch.allclose(variant(dropout=0.5).train()(x), base)


# ------------------------------------------------------------------ bad input


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="max_relative_position"):
        ShawRelativeAttention(8, 2, 0)
    with pytest.raises(ValueError, match="num_buckets"):
        T5RelativeAttention(8, 2, num_buckets=2)
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeAttention(8, 2, num_buckets=32, max_distance=8)
    with pytest.raises(TypeError, match="relative_position"):
        t5_relative_position_bucket(torch.tensor([1.0]))


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq(need_weights):
    # B == Tq == 2 (the last 2 of 5 tokens): a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. As
    # `key_padding_mask` row b is batch element b's real keys; as `mask` row i is query i's pattern.
    mod = make_shaw(k=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    per_batch = shaw_loop(mod, x[:, 3:], x, allowed=padding[:, None, :].expand(2, 2, 5))
    per_query = shaw_loop(mod, x[:, 3:], x, allowed=padding[None, :, :].expand(2, 2, 5))
    got = mod(x[:, 3:], x, x, key_padding_mask=padding, need_weights=need_weights)
    got = got[0] if need_weights else got
    assert (got - per_batch).abs().max() < TOL64
    assert (mod(x[:, 3:], x, x, mask=padding) - per_query).abs().max() < TOL64
    assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"


def test_shaw_dropout_drops_the_content_and_relative_value_terms_together():
    # eq. (3) with dropout on the weights: z_i = sum_j drop(alpha)_ij (v_j + a^V_ij), ONE dropped alpha for
    # both terms. F.dropout draws its keep-mask from the shape alone, so re-seeding and dropping a tensor of
    # ones of the weights' shape reproduces the module's mask.
    mod = make_shaw(k=2, dropout=0.5).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    _, alpha = mod.eval()(x, need_weights=True)  # (B, H, T, T), before dropout
    torch.manual_seed(7)
    keep = F.dropout(torch.ones_like(alpha), 0.5)  # 0 or 1 / (1 - p)
    torch.manual_seed(7)
    out, weights = mod.train()(x, need_weights=True)
    assert torch.equal(weights, alpha), "returned weights are taken before dropout"
    q, k, v = projections(mod, x, x)
    K, T = mod.max_relative_position, 6
    a_v = torch.stack([torch.stack([mod.rel_value[max(-K, min(K, j - i)) + K] for j in range(T)])
                       for i in range(T)])  # (T, T, Dh): a^V_ij
    dropped = alpha * keep
    z = dropped @ v + torch.einsum("bhij,ijd->bhid", dropped, a_v)
    expected = mod.out_proj(z.transpose(1, 2).reshape(2, T, 8))
    assert (out - expected).abs().max() < TOL64
    assert (mod.eval()(x) - expected).abs().max() > 1e-3, "dropout should have changed this output"


@pytest.mark.parametrize("maker", [make_shaw, make_t5])
def test_positions_and_queries_longer_than_keys_are_refused(maker):
    mod = maker()
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="positions"):
        mod(x, positions=torch.arange(4))
    with pytest.raises(TypeError, match="positions"):
        mod(x, positions=torch.arange(5.0))
    with pytest.raises(ValueError, match="query"):
        mod(torch.randn(2, 6, 8), x)  # queries are the LAST Tq of the Tk keys
