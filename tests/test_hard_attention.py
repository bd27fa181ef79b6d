"""Tests for mechanisms/hard_attention.py (Xu et al. 2015; straight-through Gumbel-softmax).

Oracles: an index gather of the value at the argmax key (eval); the sampling frequencies of the
Gumbel-max trick against softmax(scores); the relaxed sample at temperature -> 0 against the
one-hot sample drawn with the same noise; plain softmax attention built inline for distinctness.
"""

import math

import pytest
import torch

from mechanisms.hard_attention import HardAttention, gumbel_noise, straight_through_gumbel


def _module(d_model=8, num_heads=2, temperature=1.0, bias=True, seed=0):
    torch.manual_seed(seed)
    attn = HardAttention(d_model, num_heads=num_heads, temperature=temperature, bias=bias).double()
    if bias:
        with torch.no_grad():
            for name, p in attn.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    return attn


def _heads(attn, x, proj):
    B, T, _ = x.shape
    return proj(x).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, Dh)


def _scores(attn, query, key):
    q, k = _heads(attn, query, attn.q_proj), _heads(attn, key, attn.k_proj)
    return q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)  # (B, H, Tq, Tk)


def _gather_oracle(attn, query, key, index):
    """W_o applied to the concatenation over heads of v_h[index[b, h, i]], built with an explicit loop."""
    v = _heads(attn, key, attn.v_proj)
    B, H, Tq = index.shape
    picked = torch.zeros(B, Tq, H, attn.head_dim, dtype=v.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                picked[b, i, h] = v[b, h, index[b, h, i]]
    return attn.out_proj(picked.reshape(B, Tq, H * attn.head_dim))


def test_eval_output_is_the_value_at_the_argmax_key():
    attn = _module().eval()
    x, mem = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        out, w = attn(x, mem, need_weights=True)
        index = _scores(attn, x, mem).argmax(-1)  # (B, H, Tq)
        expected = _gather_oracle(attn, x, mem, index)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    assert torch.equal(w.argmax(-1), index) and torch.equal(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert torch.equal(attn(x, mem), attn(x, mem)), "eval must be deterministic"


def test_training_forward_is_the_value_of_the_gumbel_max_sample():
    attn = _module().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    noise = gumbel_noise((2, 2, 5, 5), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, w = attn(x, noise=noise, need_weights=True)
    with torch.no_grad():
        index = (_scores(attn, x, x) + noise).argmax(-1)
        expected = _gather_oracle(attn, x, x, index)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0), "forward must use the exact one-hot sample"
    assert torch.equal(w, torch.nn.functional.one_hot(index, 5).double())


def test_sample_frequencies_follow_the_softmax():
    # Gumbel-max: argmax(e + g) is distributed as softmax(e). 20000 draws; 5 binomial std. deviations.
    scores = torch.tensor([[[[1.0, 0.0, -1.0, 2.0]]]], dtype=torch.float64).expand(1, 1, 20000, 4)
    hard, _ = straight_through_gumbel(scores, 1.0, generator=torch.Generator().manual_seed(0))
    freq = hard.mean(dim=2)[0, 0]
    p = torch.softmax(scores[0, 0, 0], dim=-1)
    tol = 5 * torch.sqrt(p * (1 - p) / 20000)
    assert ((freq - p).abs() < tol).all(), f"frequencies {freq} vs softmax {p}"


def test_relaxed_sample_approaches_the_hard_one_as_temperature_goes_to_zero():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 2, 4, 6, generator=g, dtype=torch.float64)
    noise = gumbel_noise(scores.shape, generator=g, dtype=torch.float64)
    gaps = []
    for t in (1.0, 0.1, 0.01, 0.001):
        hard, soft = straight_through_gumbel(scores, t, noise=noise)
        gaps.append((soft - hard).abs().max().item())
    assert all(a > b for a, b in zip(gaps, gaps[1:])), f"gap must shrink with temperature: {gaps}"
    assert gaps[-1] < 1e-6, f"at temperature 1e-3 the relaxed sample should be one-hot, gap {gaps[-1]}"
    # and the hard sample does not depend on the temperature at all
    assert torch.equal(straight_through_gumbel(scores, 5.0, noise=noise)[0], hard)


def test_gradients_reach_query_and_key_projections_in_training():
    attn = _module().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    attn(x, generator=torch.Generator().manual_seed(0)).pow(2).sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0


def test_straight_through_gradient_is_the_gradient_of_the_relaxed_sample():
    # d loss / d scores through the module's weights must equal the gradient through y alone.
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(1, 1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    noise = gumbel_noise(scores.shape, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 5, 2, generator=g, dtype=torch.float64)
    hard, soft = straight_through_gumbel(scores, 0.5, noise=noise)
    (((hard + soft - soft.detach()) @ v) ** 2).sum().backward()
    st_grad = scores.grad.clone()
    scores.grad = None
    y = torch.softmax((scores + noise) / 0.5, dim=-1)  # the relaxed sample, written out
    ((hard.detach() @ v) * 2 * (y @ v)).sum().backward()  # d/dy of (w v)^2 at w = hard, chained through y
    assert torch.allclose(st_grad, scores.grad, atol=1e-12)


def test_gradcheck_float64():
    # The straight-through gradient is deliberately NOT the true derivative with respect to the
    # scores (that one is zero almost everywhere), so gradcheck covers what must be exact: the
    # relaxed sample with respect to the scores, and the module with respect to the values.
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(1, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    noise = gumbel_noise(scores.shape, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True]).view(1, 1, 1, 3)
    assert torch.autograd.gradcheck(lambda s: straight_through_gumbel(s, 0.7, mask, noise=noise)[1], (scores,))
    attn = _module(d_model=4, num_heads=2)
    q = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    kv = torch.randn(1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    noise = gumbel_noise((1, 2, 2, 3), generator=g, dtype=torch.float64)
    attn.train()
    assert torch.autograd.gradcheck(lambda v: attn(q, kv.detach(), v, mask=mask, noise=noise), (kv,))
    attn.eval()
    assert torch.autograd.gradcheck(lambda v: attn(q, kv.detach(), v, mask=mask), (kv,))


def test_masked_keys_are_never_sampled_and_their_values_do_not_matter():
    attn = _module().train()
    x = torch.randn(1, 4, 8, dtype=torch.float64).expand(500, 4, 8)  # 500 draws of the same input
    mask = torch.tensor([True, False, True, False]).view(1, 1, 1, 4)
    with torch.no_grad():
        _, w = attn(x, mask=mask, need_weights=True, generator=torch.Generator().manual_seed(0))
    assert w[..., 1].sum() == 0 and w[..., 3].sum() == 0
    assert w[..., 0].sum() > 0 and w[..., 2].sum() > 0, "both allowed keys should be drawn in 500 samples"
    y = x.clone()
    y[:, [1, 3]] = 50 * torch.randn(500, 2, 8, dtype=torch.float64)  # rewrite only the masked keys
    noise = gumbel_noise((500, 2, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for mode in (True, False):
        attn.train(mode)
        a = attn(x[:, :1], x, mask=mask, noise=noise[:, :, :1])
        b = attn(x[:, :1], y, mask=mask, noise=noise[:, :, :1])
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_two_dim_mask_equals_the_same_mask_expanded_to_four_dims(training, is_causal):
    # A (Tq, Tk) mask is shared by every batch element and head: it must act exactly like that mask
    # written out as (B, 1, Tq, Tk), in eval (argmax) and in training (the same Gumbel noise).
    attn = _module().train(training)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    query = x[:, 2:]  # Tq = 4 queries: the last 4 of the Tk = 6 key tokens
    mask = torch.tensor([[1, 0, 1, 1, 0, 1],
                         [0, 0, 0, 0, 0, 0],  # this query sees nothing
                         [1, 1, 0, 1, 1, 0],
                         [0, 1, 1, 0, 1, 1]], dtype=torch.bool)  # (Tq, Tk) = (4, 6)
    noise = gumbel_noise((2, 2, 4, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(is_causal=is_causal, need_weights=True, noise=noise)
    out, w = attn(query, x, mask=mask, **kw)
    out4, w4 = attn(query, x, mask=mask.expand(2, 1, 4, 6), **kw)
    assert torch.equal(w, w4) and torch.allclose(out, out4, atol=1e-12, rtol=0)
    assert (w.masked_select(~mask.expand_as(w)) == 0).all() and (w[:, :, 1] == 0).all()
    assert (w.sum(-1)[:, :, [0, 2, 3]] == 1).all()  # every other row still picks exactly one key


def test_is_causal_never_looks_ahead():
    attn = _module()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 2, 8, dtype=torch.float64)  # change the future tokens 4 and 5
    noise = gumbel_noise((2, 2, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for mode in (True, False):
        attn.train(mode)
        a, w = attn(x, is_causal=True, noise=noise, need_weights=True)
        b = attn(y, is_causal=True, noise=noise)
        assert torch.allclose(a[:, :4], b[:, :4], atol=1e-12)
        assert (w.triu(diagonal=1) == 0).all()
    # Tq < Tk (a KV cache): the last query sees every key, the first sees Tk - Tq + 1 of them
    attn.eval()
    _, w = attn(x[:, 4:], x, is_causal=True, need_weights=True)
    allowed = torch.ones(2, 6, dtype=torch.bool).tril(diagonal=4)
    assert (w[:, :, ~allowed] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_fully_masked_row_gives_zeros_not_nan(dtype, training, bias):
    # The project's rule: a query with no key gets a zero attention output BEFORE W_o, so the module
    # returns W_o(0) = W_o's bias (exactly zero with bias=False), never NaN.
    attn = _module(bias=bias).to(dtype).train(training)
    x = torch.randn(2, 3, 8, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    mask[1, 0, 2] = False
    out, w = attn(x, mask=mask, need_weights=True)
    assert not torch.isnan(out).any() and (w[1, :, 2] == 0).all()
    expected = attn.out_proj.bias if bias else torch.zeros(8, dtype=dtype)
    assert torch.equal(out[1, 2], expected)
    assert (out[1, 1] - expected).abs().max() > 0  # only the dead row collapses to the bias
    out.sum().backward()
    assert not torch.isnan(x.grad).any()


def test_low_precision_runs_and_matches_float32_choice():
    attn32 = _module().float().eval()
    x = torch.randn(2, 5, 8)
    for dtype in (torch.bfloat16, torch.float16):
        low = _module().to(dtype).eval()
        out = low(x.to(dtype))
        assert out.dtype == dtype and not torch.isnan(out).any()
        low.train()
        assert low(x.to(dtype)).dtype == dtype
    assert attn32(x).dtype == torch.float32


def test_distinct_from_soft_multi_head_attention():
    attn = _module().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        v = _heads(attn, x, attn.v_proj)
        soft = torch.softmax(_scores(attn, x, x), dim=-1) @ v  # plain MHA, same weights
        plain = attn.out_proj(soft.transpose(1, 2).reshape(2, 5, 8))
        assert (attn(x) - plain).abs().max() > 1e-3


def test_every_constructor_argument_changes_the_output():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    one, two = _module(num_heads=1).eval(), _module(num_heads=2).eval()
    two.load_state_dict(one.state_dict())
    assert (one(x) - two(x)).abs().max() > 1e-6, "num_heads"
    no_bias = _module(bias=False).eval()
    no_bias.load_state_dict(_module().state_dict(), strict=False)
    assert (no_bias(x) - _module().eval()(x)).abs().max() > 1e-6, "bias"
    assert _module(d_model=4)(torch.randn(1, 3, 4, dtype=torch.float64)).shape == (1, 3, 4), "d_model"
    # temperature shapes the backward pass only (the forward is the exact sample): compare gradients
    noise = gumbel_noise((2, 2, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for t in (0.5, 2.0):
        m = _module(temperature=t).train()
        m(x, noise=noise).pow(2).sum().backward()
        grads.append(m.q_proj.weight.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-6, "temperature"


def test_bad_input_raises_clear_errors():
    attn = HardAttention(8, num_heads=2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="d_model"):
        HardAttention(8, num_heads=3)
    with pytest.raises(ValueError, match="temperature"):
        HardAttention(8, temperature=0.0)
    with pytest.raises(ValueError, match="query"):
        attn(torch.randn(5, 8))
    with pytest.raises(ValueError, match="query"):
        attn(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="key"):
        attn(x, torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="key batch"):
        attn(x, torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="value"):
        attn(x, x, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"mask.*\(B, 1, 1, Tk\)"):
        attn(x, mask=torch.ones(2, 5, dtype=torch.bool))  # (B, Tk) with B != Tq: not a (Tq, Tk) mask
    with pytest.raises(ValueError, match=r"mask.*\(B, 1, 1, Tk\)"):
        attn(x, mask=torch.ones(2, 5, 5, dtype=torch.bool))  # 3-D: (B, Tq, Tk) or (H, Tq, Tk)?
    with pytest.raises(ValueError, match=r"mask.*\(B, 1, 1, Tk\)"):
        attn(x, mask=torch.ones(5, dtype=torch.bool))  # 1-D
    with pytest.raises(ValueError, match="mask"):
        attn(x, mask=torch.ones(2, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        attn(x, mask=torch.ones(2, 1, 1, 5))
    with pytest.raises(ValueError, match="noise"):
        attn.train()(x, noise=torch.zeros(2, 2, 5, 4))
