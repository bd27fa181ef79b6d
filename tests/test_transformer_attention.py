"""The building blocks of transformer_implementation.py against independent oracles.

Attention against a per-row float64 loop and against PyTorch's nn.MultiheadAttention; rotary,
sinusoidal, RMSNorm and SwiGLU against their formulas written out here; masks, gradients, bad input.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer_implementation import (
    FeedForward,
    KVCache,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    scaled_dot_product_attention,
)

FP32_TOL = 1e-5


def naive_attention(q, k, v, allowed):
    """Oracle: one query row at a time, softmax over the allowed keys only, float64; empty row -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Tq, D = q.shape
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    allowed = allowed.expand(B, H, Tq, k.shape[-2])
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                keys = allowed[b, h, i].nonzero().flatten().tolist()
                if not keys:
                    continue
                s = torch.tensor([float(q[b, h, i] @ k[b, h, j]) / math.sqrt(D) for j in keys], dtype=torch.float64)
                w = torch.exp(s - s.max())
                w = w / w.sum()
                out[b, h, i] = sum(w[n] * v[b, h, j] for n, j in enumerate(keys))
    return out


def causal_allowed(Tq, Tk):
    # The contract's alignment: query i is the (Tk - Tq + i)-th position, so it may see keys j <= i + Tk - Tq.
    i = torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    return j <= i + (Tk - Tq)


CASES = {
    "no_mask": dict(Tq=5, Tk=5, mask=None, is_causal=False),
    "causal_square": dict(Tq=5, Tk=5, mask=None, is_causal=True),
    "causal_Tq_lt_Tk": dict(Tq=3, Tk=7, mask=None, is_causal=True),
    "causal_single_query": dict(Tq=1, Tk=6, mask=None, is_causal=True),
    "key_padding_Tq_ne_Tk": dict(Tq=4, Tk=6, mask="padding", is_causal=False),
    "full_random_mask": dict(Tq=4, Tk=6, mask="random", is_causal=False),
    "causal_and_padding": dict(Tq=6, Tk=6, mask="padding", is_causal=True),
    "causal_Tq_gt_Tk": dict(Tq=6, Tk=4, mask=None, is_causal=True),  # first rows see no key at all
}


def make_case(Tq, Tk, mask, is_causal, B=2, H=3, D=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, Tk, 5, generator=g, dtype=dtype)
    if mask == "padding":
        lengths = torch.tensor([Tk, Tk - 2])
        m = (torch.arange(Tk)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
    elif mask == "random":
        m = torch.rand(B, H, Tq, Tk, generator=g) > 0.4
    else:
        m = None
    allowed = torch.ones(1, 1, Tq, Tk, dtype=torch.bool)
    if m is not None:
        allowed = allowed & m
    if is_causal:
        allowed = allowed & causal_allowed(Tq, Tk)
    return q, k, v, m, allowed


@pytest.mark.parametrize("name", list(CASES))
def test_explicit_and_fused_paths_equal_the_naive_oracle(name):
    c = CASES[name]
    q, k, v, m, allowed = make_case(**c)
    expected = naive_attention(q, k, v, allowed).float()
    explicit = scaled_dot_product_attention(q, k, v, mask=m, is_causal=c["is_causal"], fused=False)
    fused = scaled_dot_product_attention(q, k, v, mask=m, is_causal=c["is_causal"], fused=True)
    assert torch.allclose(explicit, expected, atol=FP32_TOL), (explicit - expected).abs().max()
    assert torch.allclose(fused, expected, atol=FP32_TOL), (fused - expected).abs().max()
    assert torch.allclose(fused, explicit, atol=FP32_TOL)


def test_weights_rows_sum_to_one_and_masked_keys_get_zero_weight():
    q, k, v, m, allowed = make_case(**CASES["causal_and_padding"])
    out, w = scaled_dot_product_attention(q, k, v, mask=m, is_causal=True, need_weights=True)
    assert w.shape == (2, 3, 6, 6)
    assert torch.all(w[~allowed.expand_as(w)] == 0)
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 6), atol=1e-6)
    # weights are returned before dropout: with dropout they are the same, the output is not
    torch.manual_seed(0)
    out_d, w_d = scaled_dot_product_attention(q, k, v, mask=m, is_causal=True, need_weights=True, dropout_p=0.5)
    assert torch.allclose(w_d, w)
    assert not torch.allclose(out_d, out)


def test_changing_masked_keys_changes_nothing():
    q, k, v, m, _ = make_case(**CASES["key_padding_Tq_ne_Tk"])
    out = scaled_dot_product_attention(q, k, v, mask=m)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -2:] = 100.0  # row 1's last two keys are padding
    v2[1, :, -2:] = -100.0
    assert torch.allclose(scaled_dot_product_attention(q, k2, v2, mask=m), out, atol=FP32_TOL)
    k2[1, :, 0] = 100.0  # a real key does matter
    assert not torch.allclose(scaled_dot_product_attention(q, k2, v2, mask=m), out, atol=1e-3)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_row_gives_zeros_not_nan(fused, dtype):
    q, k, v, _, _ = make_case(Tq=4, Tk=5, mask=None, is_causal=False, dtype=dtype)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    m = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    m[0, :, 1] = False  # batch 0, query 1 sees nothing
    m[1] = False  # batch 1 sees nothing at all
    out = scaled_dot_product_attention(q, k, v, mask=m, fused=fused)
    assert not torch.isnan(out).any()
    assert torch.all(out[0, :, 1] == 0) and torch.all(out[1] == 0)
    expected = naive_attention(q.detach(), k.detach(), v.detach(), m).to(dtype)
    tol = FP32_TOL if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.float(), expected.float(), atol=tol)
    out.float().sum().backward()
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("fused", [False, True])
def test_a_row_with_no_visible_key_never_meets_an_empty_softmax(fused, monkeypatch):
    # Zeroing such a row's output afterwards is not enough: a softmax over only -inf is NaN, kernels of
    # torch < 2.5 (and some CUDA kernels) return NaN for it, and its backward is NaN even when the
    # forward value is overwritten. So the row must reach the softmax with its keys unmasked. Checked
    # here with anomaly mode (no backward step may produce NaN) and a spy on the fused kernel.
    handed = []
    kernel = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        if attn_mask is not None:
            handed.append(bool(attn_mask.any(dim=-1).all()))  # every row sees at least one key
        return kernel(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v, _, _ = make_case(Tq=4, Tk=5, mask=None, is_causal=False)
    q.requires_grad_(True)
    m = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    m[0, :, 1] = False
    with torch.autograd.detect_anomaly():
        out = scaled_dot_product_attention(q, k, v, mask=m, fused=fused)
        out.sum().backward()
    assert torch.all(out[0, :, 1] == 0) and torch.isfinite(q.grad).all()
    assert handed == ([True] if fused else [])


def test_gradcheck_attention_both_paths_float64():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    m = torch.tensor([True, True, True, False])[None, None, None, :]
    for fused in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=m, is_causal=True, fused=fused), (q, k, v)
        )


# ----------------------------------------------------------------------------- multi-head attention


def randomize_(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def copy_into_torch_mha(ours: MultiHeadAttention, ref: nn.MultiheadAttention):
    with torch.no_grad():
        if ours.fused_projection:
            ref.in_proj_weight.copy_(ours.in_proj.weight)
            ref.in_proj_bias.copy_(ours.in_proj.bias)
        else:
            ref.q_proj_weight.copy_(ours.q_proj.weight)
            ref.k_proj_weight.copy_(ours.k_proj.weight)
            ref.v_proj_weight.copy_(ours.v_proj.weight)
            ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)


@pytest.mark.parametrize("masks", ["none", "key_padding", "causal", "both"])
def test_mha_equals_torch_multihead_attention(masks):
    B, T, E, H = 3, 6, 16, 4
    ours = randomize_(MultiHeadAttention(E, H)).eval()
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    copy_into_torch_mha(ours, ref)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 4:] = False
    keep[2, 2:] = False
    use_pad, use_causal = masks in ("key_padding", "both"), masks in ("causal", "both")
    # Opposite polarity: ours True = may attend; PyTorch's bool masks True = may NOT attend.
    ref_kwargs = dict(need_weights=True, average_attn_weights=False)
    if use_pad:
        ref_kwargs["key_padding_mask"] = ~keep
    if use_causal:
        ref_kwargs["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)
    expected, expected_w = ref(x, x, x, **ref_kwargs)
    mask = keep[:, None, None, :] if use_pad else None
    got = ours(x, mask=mask, is_causal=use_causal)  # fused path
    got_w_out, got_w = ours(x, x, x, mask=mask, is_causal=use_causal, need_weights=True)  # explicit path
    assert torch.allclose(got, expected, atol=FP32_TOL), (got - expected).abs().max()
    assert torch.allclose(got_w_out, expected, atol=FP32_TOL)
    assert torch.allclose(got_w, expected_w, atol=FP32_TOL)


@pytest.mark.parametrize("dims", ["same_dims", "kdim_vdim"])
def test_mha_cross_attention_equals_torch(dims):
    B, Tq, Tk, E, H = 2, 3, 5, 8, 2
    kdim, vdim = (None, None) if dims == "same_dims" else (6, 5)
    ours = randomize_(MultiHeadAttention(E, H, kdim=kdim, vdim=vdim)).eval()
    assert ours.fused_projection == (dims == "same_dims")
    ref = nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=vdim).eval()
    copy_into_torch_mha(ours, ref)
    g = torch.Generator().manual_seed(3)
    query = torch.randn(B, Tq, E, generator=g)
    key = torch.randn(B, Tk, kdim or E, generator=g)
    value = key if dims == "same_dims" else torch.randn(B, Tk, vdim, generator=g)
    keep = torch.tensor([[True] * Tk, [True] * (Tk - 2) + [False] * 2])
    expected, _ = ref(query, key, value, key_padding_mask=~keep)
    got = ours(query, key, value, mask=keep[:, None, None, :])
    assert torch.allclose(got, expected, atol=FP32_TOL), (got - expected).abs().max()
    if dims == "same_dims":  # key is not value: the three-slice branch of the fused weight
        value2 = torch.randn(B, Tk, E, generator=g)
        expected2, _ = ref(query, key, value2, key_padding_mask=~keep)
        assert torch.allclose(ours(query, key, value2, mask=keep[:, None, None, :]), expected2, atol=FP32_TOL)


def test_gradcheck_mha_float64():
    mha = randomize_(MultiHeadAttention(4, 2)).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mha(x, is_causal=True), (x,))
    assert torch.autograd.gradcheck(lambda x: mha(x, need_weights=True)[0], (x,))


def test_mha_every_parameter_gets_a_gradient():
    mha = randomize_(MultiHeadAttention(8, 2))
    mha(torch.randn(2, 4, 8), is_causal=True).square().sum().backward()
    for name, p in mha.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mha_dropout_is_off_in_eval():
    mha = randomize_(MultiHeadAttention(8, 2, dropout=0.5))
    plain = randomize_(MultiHeadAttention(8, 2, dropout=0.0)).eval()
    x = torch.randn(2, 4, 8)
    mha.eval()
    assert torch.equal(mha(x), plain(x))
    mha.train()
    assert not torch.allclose(mha(x), plain(x))


def test_mha_with_cache_equals_full_causal_attention():
    mha = randomize_(MultiHeadAttention(8, 2)).eval()
    rotary = RotaryEmbedding(4, 16)
    x = torch.randn(2, 7, 8)
    full = mha(x, is_causal=True, rotary=rotary)
    cache = KVCache(16)
    parts = [mha(x[:, :3], is_causal=True, cache=cache, rotary=rotary)]
    parts += [mha(x[:, t:t + 1], is_causal=True, cache=cache, rotary=rotary) for t in range(3, 7)]
    assert cache.length == 7
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=FP32_TOL)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(2).update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))


# ----------------------------------------------------------------------------- bad input


def test_attention_bad_input_raises_naming_the_argument():
    q = torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match="query"):
        scaled_dot_product_attention(q[0], q, q)
    with pytest.raises(ValueError, match="key"):
        scaled_dot_product_attention(q, torch.randn(2, 2, 3, 5), q)
    with pytest.raises(ValueError, match="value"):
        scaled_dot_product_attention(q, q, torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        scaled_dot_product_attention(q, q, q, mask=torch.ones(2, 3, dtype=torch.bool))  # (B, Tk), not (Tq, Tk)
    with pytest.raises(TypeError, match="mask"):
        scaled_dot_product_attention(q, q, q, mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="need_weights"):
        scaled_dot_product_attention(q, q, q, need_weights=True, fused=True)


def test_mha_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match="d_model"):
        MultiHeadAttention(10, 4)
    mha = MultiHeadAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="query"):
        mha(torch.randn(5, 8))
    with pytest.raises(ValueError, match="query"):
        mha(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="batch size"):
        mha(x, torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match=r"mask.*\(2, 5\)"):
        mha(x, mask=torch.ones(2, 5, dtype=torch.bool))  # a (B, Tk) padding mask must be (B, 1, 1, Tk)
    with pytest.raises(ValueError, match="mask"):
        mha(x, mask=torch.ones(2, 1, 5, dtype=torch.bool))  # 3-D is ambiguous
    with pytest.raises(TypeError, match="mask"):
        mha(x, mask=torch.ones(2, 1, 1, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(5, 8)


# ----------------------------------------------------------------------------- positions, norms, FFN


def test_rotary_matches_the_pairwise_rotation_formula():
    Dh, base = 6, 10000.0
    rope = RotaryEmbedding(Dh, 32, base=base)
    x = torch.randn(1, 1, 5, Dh, dtype=torch.float32)
    got = rope(x, positions=7)
    half = Dh // 2
    expected = torch.empty_like(x)
    for t in range(5):
        m = 7 + t
        for i in range(half):
            theta = m * base ** (-2 * i / Dh)
            a, b = x[0, 0, t, i], x[0, 0, t, i + half]
            expected[0, 0, t, i] = a * math.cos(theta) - b * math.sin(theta)
            expected[0, 0, t, i + half] = b * math.cos(theta) + a * math.sin(theta)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(rope(x, torch.arange(7, 12)), got)


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 64)
    q = torch.randn(1, 1, 1, 8, dtype=torch.float32)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float32)

    def score(m, n):
        return float((rope(q, m) * rope(k, n)).sum())

    for m, n in [(5, 2), (9, 9), (3, 10)]:
        for shift in (1, 7, 40):
            assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # a different offset gives a different score


def test_sinusoidal_table_matches_the_paper_formula():
    d, L = 6, 10
    pe = SinusoidalPositionalEncoding(d, L)
    x = torch.zeros(1, 4, d)
    got = pe(x, offset=3)[0]
    for t in range(4):
        pos = 3 + t
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert abs(float(got[t, 2 * i]) - math.sin(angle)) < 1e-5
            assert abs(float(got[t, 2 * i + 1]) - math.cos(angle)) < 1e-5


def test_rmsnorm_matches_its_formula():
    norm = RMSNorm(7, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(7))
    x = torch.randn(3, 4, 7) * 3 + 1
    x64 = x.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert torch.allclose(norm(x).double(), expected, atol=1e-5)
    assert torch.allclose(norm(x), F.rms_norm(x, (7,), norm.weight, eps=1e-5), atol=1e-5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_feedforward_activations_follow_their_formulas_and_differ():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    relu = randomize_(FeedForward(8, 16, activation="relu"))
    gelu = randomize_(FeedForward(8, 16, activation="gelu"))  # same seed -> same weights as relu
    assert torch.equal(relu.linear1.weight, gelu.linear1.weight)
    h = x @ relu.linear1.weight.T + relu.linear1.bias
    assert torch.allclose(relu(x), torch.relu(h) @ relu.linear2.weight.T + relu.linear2.bias, atol=1e-5)
    erf_gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    assert torch.allclose(gelu(x), erf_gelu @ gelu.linear2.weight.T + gelu.linear2.bias, atol=1e-5)
    assert not torch.allclose(relu(x), gelu(x), atol=1e-3)
    swiglu = randomize_(FeedForward(8, 16, activation="swiglu"))
    assert swiglu.linear1.weight.shape == (32, 8)
    h = x @ swiglu.linear1.weight.T + swiglu.linear1.bias
    gate, up = h[..., :16], h[..., 16:]
    expected = (gate * torch.sigmoid(gate) * up) @ swiglu.linear2.weight.T + swiglu.linear2.bias
    assert torch.allclose(swiglu(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, 16, activation="tanh")


# ----------------------------------------------------------------------------- key padding mask


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_key_padding_mask_combines_with_mask_and_causal_by_and(is_causal, fused):
    B, H, Tq, Tk = 2, 3, 4, 6
    q, k, v, _, _ = make_case(Tq=Tq, Tk=Tk, mask=None, is_causal=False, B=B, H=H)
    keep = torch.tensor([[True] * Tk, [False, True, True, True, False, False]])  # (B, Tk)
    m = torch.rand(Tq, Tk, generator=torch.Generator().manual_seed(4)) > 0.3  # (Tq, Tk)
    allowed = m & keep[:, None, None, :]  # what the oracle is told, written out
    if is_causal:
        allowed = allowed & causal_allowed(Tq, Tk)
    expected = naive_attention(q, k, v, allowed).float()
    got = scaled_dot_product_attention(q, k, v, mask=m, key_padding_mask=keep, is_causal=is_causal, fused=fused)
    assert torch.allclose(got, expected, atol=FP32_TOL), (got - expected).abs().max()


def test_mha_key_padding_mask_equals_torch_and_counts_cached_keys():
    B, T, E, H = 3, 6, 8, 2
    ours = randomize_(MultiHeadAttention(E, H)).eval()
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    copy_into_torch_mha(ours, ref)
    x = torch.randn(B, T, E, generator=torch.Generator().manual_seed(5))
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 4:] = False
    keep[2, :2] = False
    expected, _ = ref(x, x, x, key_padding_mask=~keep)  # PyTorch: True = padding, the opposite polarity
    assert torch.allclose(ours(x, key_padding_mask=keep), expected, atol=FP32_TOL)
    assert torch.allclose(ours(x, x, x, key_padding_mask=keep, need_weights=True)[0], expected, atol=FP32_TOL)
    # With a cache the padding mask covers every key attended: the cached ones and the new ones.
    full = ours(x, key_padding_mask=keep, is_causal=True)
    cache = KVCache(T)
    first = ours(x[:, :4], key_padding_mask=keep[:, :4], is_causal=True, cache=cache)
    rest = ours(x[:, 4:], key_padding_mask=keep, is_causal=True, cache=cache)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=FP32_TOL)


def test_key_padding_mask_errors_name_it_with_both_shapes():
    mha = MultiHeadAttention(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(5, 2\), expected \(B, Tk\) = \(2, 5\)"):
        mha(x, key_padding_mask=torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        mha(x, key_padding_mask=torch.ones(2, 5))
    cache = KVCache(8)
    mha(x[:, :3], cache=cache)
    with pytest.raises(ValueError, match=r"key_padding_mask.*\(2, 5\)"):  # 3 cached + 2 new keys
        mha(x[:, 3:], key_padding_mask=torch.ones(2, 2, dtype=torch.bool), cache=cache)
    assert cache.length == 3  # the refused call left the cache untouched
    q = torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match=r"key_padding_mask.*\(2, 3\)"):
        scaled_dot_product_attention(q, q, q, key_padding_mask=torch.ones(2, 1, 1, 3, dtype=torch.bool))
