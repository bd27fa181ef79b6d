"""Tests for mechanisms/rotary_embedding.py (RoPE and RotarySelfAttention).

Oracles written here: an explicit 2x2 rotation per feature pair in a Python loop (math.cos/math.sin),
and plain multi-head attention built from the module's projection weights.
"""
import math

import pytest
import torch

from mechanisms.rotary_embedding import RotaryEmbedding, RotarySelfAttention, apply_rotary

TOL64 = 1e-12  # float64, rotations and dot products of a few terms
TOL64_ATTN = 1e-10  # float64, a whole attention layer


def rotate_by_hand(x, positions, base, interleaved):
    """x (T, Dh) float64; turn pair i of row t by positions[t] * base^(-2i/Dh) with a 2x2 matrix."""
    T, Dh = x.shape
    out = x.clone()
    for t in range(T):
        for i in range(Dh // 2):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + Dh // 2)
            ang = float(positions[t]) * base ** (-2.0 * i / Dh)
            rot = torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]],
                               dtype=torch.float64)
            out[t, [a, b]] = rot @ x[t, [a, b]]
    return out


def plain_mha(mod, query, key=None, allowed=None):
    """Multi-head attention without any rotation, from the module's projection weights."""
    key = query if key is None else key
    B, Tq, D = query.shape
    Tk = key.shape[1]
    H = mod.num_heads
    Dh = D // H
    q = mod.q_proj(query).view(B, Tq, H, Dh).transpose(1, 2)
    k = mod.k_proj(key).view(B, Tk, H, Dh).transpose(1, 2)
    v = mod.v_proj(key).view(B, Tk, H, Dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(scores, -1).nan_to_num(0.0)
    return mod.out_proj((w @ v).transpose(1, 2).reshape(B, Tq, D))


def make(d_model=8, num_heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    return RotarySelfAttention(d_model, num_heads, **kw)


# ------------------------------------------------------------------ the rotation itself
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rotation_equals_explicit_2x2_rotation_per_pair(interleaved, base):
    rope = RotaryEmbedding(8, base=base, interleaved=interleaved)
    q = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 7, 30, 99])
    q_rot, k_rot = rope(q, k, positions=pos)
    assert (q_rot[0, 0] - rotate_by_hand(q[0, 0], pos, base, interleaved)).abs().max() < TOL64
    assert (k_rot[0, 0] - rotate_by_hand(k[0, 0], pos, base, interleaved)).abs().max() < TOL64


@pytest.mark.parametrize("interleaved", [True, False])
def test_score_depends_only_on_relative_position(interleaved):
    rope = RotaryEmbedding(16, interleaved=interleaved)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        q_m, _ = rope(q, q, positions=torch.tensor([m]))
        k_n, _ = rope(k, k, positions=torch.tensor([n]))
        return float((q_m * k_n).sum())

    for delta in (-5, 0, 3, 40):
        scores = [score(m, m + delta) for m in (50, 51, 60, 200)]
        assert max(scores) - min(scores) < TOL64, f"delta={delta}: {scores}"
    assert abs(score(50, 53) - score(50, 54)) > 1e-6  # but it does depend on the distance


@pytest.mark.parametrize("interleaved", [True, False])
def test_norms_are_preserved(interleaved):
    rope = RotaryEmbedding(8, interleaved=interleaved)
    q = torch.randn(2, 3, 20, 8, dtype=torch.float64)
    q_rot, k_rot = rope(q, 2 * q, offset=7)
    assert (q_rot.norm(dim=-1) - q.norm(dim=-1)).abs().max() < TOL64
    assert (k_rot.norm(dim=-1) - 2 * q.norm(dim=-1)).abs().max() < TOL64


def test_the_two_pairings_are_a_fixed_permutation_of_each_other():
    Dh = 8
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved layout -> half-split layout
    inverse = torch.argsort(perm)
    inter = RotaryEmbedding(Dh, interleaved=True)
    half = RotaryEmbedding(Dh, interleaved=False)
    q = torch.randn(2, 2, 9, Dh, dtype=torch.float64)
    k = torch.randn(2, 2, 9, Dh, dtype=torch.float64)
    qi, ki = inter(q, k)
    qh, kh = half(q[..., perm], k[..., perm])
    assert (qh[..., inverse] - qi).abs().max() < TOL64
    assert (kh[..., inverse] - ki).abs().max() < TOL64
    assert (qh - qi).abs().max() > 1e-3  # without the permutation they differ


def test_offset_and_positions_for_kv_caching():
    rope = RotaryEmbedding(8, interleaved=False)
    q = torch.randn(1, 2, 12, 8)
    k = torch.randn(1, 2, 12, 8)
    q_all, k_all = rope(q, k)
    q_new, k_new = rope(q[:, :, 9:], k[:, :, 9:], offset=9)       # three new tokens after 9 cached
    assert torch.allclose(q_new, q_all[:, :, 9:], atol=1e-6)
    assert torch.allclose(k_new, k_all[:, :, 9:], atol=1e-6)
    q_pos, _ = rope(q[:, :, 9:], k[:, :, 9:], positions=torch.tensor([9, 10, 11]))
    assert torch.equal(q_pos, q_new)
    # (B, T) positions: one row per sequence
    pos = torch.stack([torch.arange(12), torch.arange(12) + 5])
    q2 = torch.cat([q, q])
    q_b, _ = rope(q2, q2, positions=pos)
    assert torch.allclose(q_b[0], q_all[0], atol=1e-6)
    q_shift, _ = rope(q, q, offset=5)
    assert torch.allclose(q_b[1], q_shift[0], atol=1e-6)


def test_apply_rotary_with_cos_sin_matches_forward():
    rope = RotaryEmbedding(8, interleaved=True)
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = rope.cos_sin(torch.arange(3, 8))
    assert cos.shape == (5, 4)
    a = apply_rotary(q, k, cos, sin, interleaved=True)
    b = rope(q, k, offset=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("batch", [2, 3])
def test_apply_rotary_lines_per_sequence_cos_sin_up_with_the_batch(interleaved, batch):
    # cos_sin of (B, T) positions is (B, T, Dh/2). It must rotate batch element b by its own positions for
    # every head; with B == H == 2 a broadcast against (B, H, T, Dh) would silently use head h's row instead.
    rope = RotaryEmbedding(8, base=100.0, interleaved=interleaved)
    q = torch.randn(batch, 2, 5, 8, dtype=torch.float64)
    k = torch.randn(batch, 2, 5, 8, dtype=torch.float64)
    pos = torch.stack([torch.arange(5) + 7 * b for b in range(batch)])  # (B, T), different per sequence
    cos, sin = rope.cos_sin(pos, torch.float64)
    assert cos.shape == (batch, 5, 4)
    q_rot, k_rot = apply_rotary(q, k, cos, sin, interleaved=interleaved)
    for b in range(batch):
        for h in range(2):
            assert (q_rot[b, h] - rotate_by_hand(q[b, h], pos[b], 100.0, interleaved)).abs().max() < TOL64
            assert (k_rot[b, h] - rotate_by_hand(k[b, h], pos[b], 100.0, interleaved)).abs().max() < TOL64
    q_fwd, k_fwd = rope(q, k, positions=pos)  # forward takes the same (B, T) positions
    assert torch.equal(q_fwd, q_rot) and torch.equal(k_fwd, k_rot)


def test_apply_rotary_refuses_cos_sin_that_fit_neither_the_batch_nor_the_length():
    rope = RotaryEmbedding(8)
    q = k = torch.randn(3, 2, 5, 8)
    for positions in (torch.arange(6), torch.arange(10).view(2, 5)):  # wrong T; per-sequence rows for B=2
        cos, sin = rope.cos_sin(positions)
        with pytest.raises(ValueError, match=r"cos and sin.*\(B, T, Dh/2\) = \(3, 5, 4\)"):
            apply_rotary(q, k, cos, sin)
    with pytest.raises(ValueError, match="cos"):
        apply_rotary(q, k, torch.randn(5, 3), torch.randn(5, 3))  # Dh/2 wrong


@pytest.mark.parametrize("positions", [None, "per_sequence"])
def test_rotary_embedding_refuses_q_and_k_of_different_batch_sizes(positions):
    rope = RotaryEmbedding(8)
    q, k = torch.randn(2, 2, 5, 8), torch.randn(3, 2, 5, 8)
    pos = torch.arange(10).view(2, 5) if positions else None
    with pytest.raises(ValueError, match=r"k must have the batch size and length of q.*\(3, 2, 5, 8\)"):
        rope(q, k, positions=pos)
    with pytest.raises(ValueError, match=r"q and k must share B"):
        apply_rotary(q, k, *rope.cos_sin(torch.arange(5)))


def test_angles_are_computed_in_float32_for_bf16():
    rope = RotaryEmbedding(8).to(torch.bfloat16)
    cos, _ = rope.cos_sin(torch.tensor([1001]), torch.bfloat16)
    # bf16 cannot hold the angle 1001 (it rounds to 1000 or 1002, whose cosines differ by > 0.5)
    assert abs(float(cos[0, 0]) - math.cos(1001.0)) < 1e-2


# ------------------------------------------------------------------ attention: limit case and distinct
def test_equal_positions_give_plain_multi_head_attention():
    mod = make().double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    for p in (0, 5):
        out = mod(x, positions=torch.full((7,), p))
        assert (out - plain_mha(mod, x)).abs().max() < TOL64_ATTN, f"positions all {p}"


def test_distinct_from_plain_multi_head_attention():
    mod = make().double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    assert (mod(x) - plain_mha(mod, x)).abs().max() > 1e-3


def test_attention_against_oracle_with_hand_rotation():
    for interleaved in (True, False):
        mod = make(interleaved=interleaved, base=100.0).double()
        x = torch.randn(1, 5, 8, dtype=torch.float64)
        H, Dh = 2, 4
        pos = torch.arange(5)
        q = mod.q_proj(x).view(1, 5, H, Dh).transpose(1, 2)[0]
        k = mod.k_proj(x).view(1, 5, H, Dh).transpose(1, 2)[0]
        v = mod.v_proj(x).view(1, 5, H, Dh).transpose(1, 2)[0]
        heads = []
        for h in range(H):
            qr = rotate_by_hand(q[h], pos, 100.0, interleaved)
            kr = rotate_by_hand(k[h], pos, 100.0, interleaved)
            heads.append(torch.softmax(qr @ kr.T / math.sqrt(Dh), -1) @ v[h])
        expected = mod.out_proj(torch.cat(heads, dim=-1).unsqueeze(0))
        assert (mod(x) - expected).abs().max() < TOL64_ATTN


def test_relative_only_shifting_all_positions_changes_nothing():
    mod = make().double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    a = mod(x, positions=torch.arange(6))
    b = mod(x, positions=torch.arange(6) + 37)
    assert (a - b).abs().max() < TOL64_ATTN


def test_kv_cache_step_equals_full_causal_attention():
    mod = make().double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    full = mod(x, is_causal=True)
    last = mod(x[:, -2:], x, x, is_causal=True)        # queries = the last 2 of the 9 key tokens
    assert (last - full[:, -2:]).abs().max() < TOL64_ATTN


# ------------------------------------------------------------------ masks


# ------------------------------------------------------------------ arguments


def test_every_constructor_argument_changes_the_output():
    x = torch.randn(2, 6, 8)
    ref = make()
    base = ref(x)

    def variant(**kw):
        args = dict(d_model=8, num_heads=2, dropout=0.0, bias=True, base=10000.0, max_seq_len=4096,
                    interleaved=False)
        args.update(kw)
        mod = RotarySelfAttention(**args)
        mod.load_state_dict(ref.state_dict(), strict=False)
        return mod

    assert torch.equal(variant()(x), base)
    assert not torch.allclose(variant(num_heads=4)(x), base)
    assert not torch.allclose(variant(bias=False)(x), base)
    assert not torch.allclose(variant(base=10.0)(x), base)
    assert not torch.allclose(variant(interleaved=True)(x), base)
    assert not torch.allclose(variant(dropout=0.5).train()(x), base)
    with pytest.raises(ValueError, match="max_seq_len"):
        variant(max_seq_len=5)(x)                     # 6 positions do not fit
    assert torch.equal(variant(max_seq_len=6)(x), base)
    assert make(d_model=12, num_heads=3)(torch.randn(2, 6, 12)).shape == (2, 6, 12)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_is_per_batch_element_even_when_batch_equals_tq(need_weights):
    # B == Tq == 2 (the last 2 of 5 tokens): a (B, Tk) padding mask has the shape of a (Tq, Tk) mask. With
    # all positions equal the rotations cancel (the limit case), so plain attention with the mask is the
    # oracle: as `key_padding_mask` row b is batch element b's real keys, as `mask` row i is query i's.
    mod = make().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    same = torch.zeros(5, dtype=torch.long)
    per_batch = plain_mha(mod, x[:, 3:], x, allowed=padding[:, None, None, :])
    per_query = plain_mha(mod, x[:, 3:], x, allowed=padding)
    got = mod(x[:, 3:], x, x, key_padding_mask=padding, positions=same, need_weights=need_weights)
    got = got[0] if need_weights else got
    assert (got - per_batch).abs().max() < TOL64_ATTN
    assert (mod(x[:, 3:], x, x, mask=padding, positions=same) - per_query).abs().max() < TOL64_ATTN
    assert (per_batch - per_query).abs().max() > 1e-3, "the two readings should differ on this input"


def test_mechanism_specific_bad_input():
    mod = make()
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="positions"):
        mod(x, positions=torch.arange(4))
    with pytest.raises(TypeError, match="positions"):
        mod(x, positions=torch.arange(5.0))
    with pytest.raises(ValueError, match="query"):
        mod(torch.randn(2, 6, 8), x)  # queries are the LAST Tq of the Tk keys
